"""The trainer's command line: --help everywhere, TOML config with flags winning, and one-line
errors with exit code 2 for bad inputs (missing file, wrong shapes, bad labels, unknown model)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tensorwire.trainer import cli
from tensorwire.trainer.config import FitOptions, PublishOptions
from tensorwire.trainer.default_repo import main as build_default_repo
from tensorwire.trainer.options import resolve

COMMANDS = {
    "fit": cli.fit,
    "export": cli.export,
    "quantize": cli.quantize,
    "publish": cli.publish,
    "train": cli.train,
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    assert COMMANDS[command](["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tensorwire {command}") and "--config" in out and "--run" in out


def test_build_default_repo_has_help(capsys):
    assert build_default_repo(["--help"]) == 0
    assert "--repo" in capsys.readouterr().out


def test_train_offers_the_options_of_all_four_steps(capsys):
    cli.train(["--help"])
    out = capsys.readouterr().out
    for flag in ("--nproc-per-node", "--tolerance", "--calibration-samples", "--repo", "--publish-formats"):
        assert flag in out


@pytest.fixture
def data_files(tmp_path):
    files = {
        "shapes": ("bad_shapes.npz", dict(X=np.zeros((10, 4), np.float32), y=np.zeros(9, np.int64))),
        "negative": ("negative.npz", dict(X=np.zeros((10, 4), np.float32), y=np.arange(10) - 1)),
        "fraction": ("fraction.npz", dict(X=np.zeros((10, 4), np.float32), y=np.linspace(0, 1, 10))),
        "empty": ("empty.npz", dict(X=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))),
        "nan": ("nan.npz", dict(X=np.full((10, 4), np.nan, np.float32), y=np.arange(10) % 2)),
    }
    paths = {}
    for key, (name, arrays) in files.items():
        np.savez(tmp_path / name, **arrays)
        paths[key] = tmp_path / name
    (tmp_path / "ragged.csv").write_text("1,2,0\n3,4\n")
    (tmp_path / "header_only.csv").write_text("a,b,label\n")
    (tmp_path / "ok.csv").write_text("a,b,label\n" + "".join(f"{i % 7},{i % 5},{i % 3}\n" for i in range(60)))
    paths.update(
        ragged=tmp_path / "ragged.csv", header_only=tmp_path / "header_only.csv", ok=tmp_path / "ok.csv"
    )
    return paths


BAD_INPUTS = [
    (["--data", "{missing}"], "no such file"),
    (["--data", "{shapes}"], "mismatched shapes: X has 10 samples but y has 9 labels"),
    (["--data", "{ragged}"], "line 2 has 2 fields, expected 3"),
    (["--data", "digits", "--input-shape", "3,8,8"], "mismatched shapes"),
    (["--data", "{ok}", "--model", "cnn"], "needs image samples"),
    (["--data", "{negative}"], "label -1 out of range"),
    (["--data", "{fraction}"], "whole numbers"),
    (["--data", "{ok}", "--num-classes", "2"], "label 2 out of range for --num-classes 2"),
    (["--data", "{empty}"], "empty dataset"),
    (["--data", "{header_only}"], "empty dataset"),
    (["--data", "{nan}"], "NaN"),
    (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    (["--model", "no_such_module:factory"], "cannot import module"),
    (["--model-arg", "depth=3"], "takes no argument 'depth'"),
    (["--data", "table.parquet"], "unknown data"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--nnodes", "2"], "--rdzv-endpoint"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_give_one_line_and_exit_2(args, message, data_files, tmp_path, capsys):
    paths = {**{k: str(v) for k, v in data_files.items()}, "missing": str(tmp_path / "missing.npz")}
    code = cli.fit([arg.format(**paths) for arg in args] + ["--run", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("tensorwire fit: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing started


def test_console_script_exit_code_and_usage_errors(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "tensorwire.cli", "fit", "--data", str(tmp_path / "x.npz")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert missing.stderr.startswith("tensorwire fit: error: ") and "no such file" in missing.stderr
    assert cli.fit(["--no-such-flag"]) == 2
    assert cli.fit(["--optimizer", "lbfgs"]) == 2


def test_config_file_then_section_then_flags(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(
        'epochs = 3\nmodel = "mlp"\nrepo = "shared"\n[fit]\nepochs = 4\nnproc-per-node = 2\n'
        "model_args = { hidden = [32] }\n[publish]\nmax_batch_size = 8\n"
    )
    config = cli.read_config_file(str(path))
    cli.check_config_keys(config, str(path), cli.SECTIONS)
    fit, explicit = resolve(FitOptions, "fit", config, {}, str(path))
    assert (fit.epochs, fit.model, fit.nproc_per_node, fit.model_args) == (4, "mlp", 2, {"hidden": [32]})
    assert {"epochs", "model", "nproc_per_node", "model_args"} <= explicit
    fit, _ = resolve(FitOptions, "fit", config, {"epochs": "7", "model_args": ["width=8"]}, str(path))
    assert fit.epochs == 7 and fit.model_args == {"width": 8}  # flags win
    publish, _ = resolve(PublishOptions, "publish", config, {}, str(path))
    assert (publish.repo, publish.max_batch_size) == ("shared", 8)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochz = 3\n", "unknown key 'epochz'"),
        ("[fit]\nlearning_rate = 0.1\n", "unknown key 'fit.learning_rate'"),
        ("epochs = 'many'\n", "expected an integer"),
        ("epochs = \n", "not valid TOML"),
    ],
)
def test_bad_config_files_are_named_in_the_error(text, message, tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert cli.fit(["--config", str(path), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and err.count("\n") == 1


def test_flags_win_over_the_config_file_end_to_end(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('data = "table.parquet"\n')
    assert cli.fit(["--config", str(path), "--data", str(tmp_path / "given.npz")]) == 2
    assert "given.npz: no such file" in capsys.readouterr().err


def test_publish_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert cli.publish(["--run", str(tmp_path / "none"), "--repo", str(tmp_path / "models")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()


def test_train_rejects_unknown_publish_formats_before_training(tmp_path, capsys):
    assert cli.train(["--publish-formats", "onnx,tflite", "--run", str(tmp_path / "r")]) == 2
    assert "unknown format 'tflite'" in capsys.readouterr().err

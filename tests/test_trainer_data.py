"""Data sources, splits, augmentation and model construction (no processes started)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tensorwire.trainer.data import DataSpec, _split_indices, load, load_splits
from tensorwire.trainer.errors import TrainerError
from tensorwire.trainer.models import build_model, check_model
from tensorwire.trainer.runfolder import load_checkpoint, save_checkpoint
from tensorwire.trainer.training import augment_images, make_optimizer, make_schedule


def test_digits_are_scikit_learns_bundled_digits_scaled_to_0_1():
    from sklearn.datasets import load_digits

    x, y, classes, name = load(DataSpec())
    bunch = load_digits()
    assert (name, classes, x.shape, x.dtype) == ("digits", 10, (1797, 1, 8, 8), np.float32)
    np.testing.assert_array_equal(x.reshape(1797, 64), (bunch.data / 16).astype(np.float32))
    np.testing.assert_array_equal(y, bunch.target)


def test_splits_are_deterministic_disjoint_and_stratified():
    a, b = load_splits(DataSpec(seed=3)), load_splits(DataSpec(seed=3))
    np.testing.assert_array_equal(a.test.x, b.test.x)
    y = load(DataSpec())[1]
    train, val, test = _split_indices(y, 0.15, 0.15, seed=3)
    assert len(set(train) | set(val) | set(test)) == len(train) + len(val) + len(test) == 1797
    counts = np.bincount(y[test], minlength=10)
    assert counts.min() >= 25 and counts.max() <= 30  # ~15 % of each class
    assert not np.array_equal(load_splits(DataSpec(seed=4)).test.y, a.test.y)


def test_csv_with_header_and_named_label_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("label,f1,f2\n" + "".join(f"{i % 2},{i},{i * 2}\n" for i in range(20)))
    x, y, classes, _ = load(DataSpec(data=str(path), label_column="label"))
    assert x.shape == (20, 2) and classes == 2 and list(y[:4]) == [0, 1, 0, 1]
    np.testing.assert_array_equal(x[3], [3, 6])


def test_csv_without_header_uses_the_last_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("".join(f"{i},{i + 1},{i % 3}\n" for i in range(12)))
    x, y, classes, _ = load(DataSpec(data=str(path)))
    assert x.shape == (12, 2) and classes == 3


def test_npz_reshaped_to_images(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.random.rand(30, 12).astype(np.float64), y=np.arange(30) % 3)
    x, _, _, _ = load(DataSpec(data=str(tmp_path / "d.npz"), input_shape=(3, 2, 2)))
    assert x.shape == (30, 3, 2, 2) and x.dtype == np.float32


def test_synthetic_data_of_any_shape():
    for shape in [(3, 32, 32), (16,), (5, 7)]:
        x, y, classes, _ = load(DataSpec(data="synthetic", input_shape=shape, num_samples=50, num_classes=4))
        assert x.shape == (50, *shape) and classes == 4 and y.max() < 4


def test_too_few_samples_for_the_splits(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]))
    with pytest.raises(TrainerError, match="too few samples"):
        load_splits(DataSpec(data=str(tmp_path / "d.npz")))


def test_shift_augmentation_moves_pixels_and_flip_mirrors():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(64, 1, 1, 1)
    shifted = augment_images(x, torch.Generator().manual_seed(0), shift=1, flip=False)
    assert shifted.shape == x.shape
    assert any(not torch.equal(s, x[0]) for s in shifted)  # most samples moved
    assert set(shifted.unique().tolist()) <= set(range(16))  # no new values, only zeros padded in
    flipped = augment_images(x, torch.Generator().manual_seed(0), shift=0, flip=True)
    assert all(torch.equal(f, x[0]) or torch.equal(f, x[0].flip(-1)) for f in flipped)


@pytest.mark.parametrize("family", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_built_in_models_map_samples_to_logits(family, shape):
    model = build_model(family, shape, 7, dropout=0.2)
    check_model(model, shape, 7, family)
    assert model(torch.zeros(3, *shape)).shape == (3, 7)


def test_flat_inputs_for_mlp_and_transformer_but_not_cnn():
    for family in ("mlp", "transformer"):
        check_model(build_model(family, (20,), 3), (20,), 3, family)
    with pytest.raises(TrainerError, match="needs image samples"):
        build_model("cnn", (20,), 3)


def test_user_factory_gets_only_the_options_it_takes(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def tiny(input_shape, num_classes, hidden=8):\n"
        "    layers = [nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]\n"
        "    return nn.Sequential(*layers)\n"
        "def not_a_model(input_shape, num_classes):\n    return 42\n"
    )
    monkeypatch.chdir(tmp_path)
    model = build_model("my_models:tiny", (1, 8, 8), 10, {"hidden": 16}, dropout=0.1)  # dropout not passed
    assert model[1].out_features == 16
    with pytest.raises(TrainerError, match="not a torch.nn.Module"):
        build_model("my_models:not_a_model", (1, 8, 8), 10)
    with pytest.raises(TrainerError, match="has no callable"):
        build_model("my_models:missing", (1, 8, 8), 10)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "step", "constant"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_optimizer_and_schedule_state_round_trip_weights_only(schedule, optimizer, tmp_path):
    model = build_model("mlp", (4,), 2)
    opt = make_optimizer(model, optimizer, 0.01, 1e-4, 0.9)
    sched = make_schedule(opt, schedule, 0.01, epochs=3, steps_per_epoch=5)
    model(torch.zeros(2, 4)).sum().backward()
    opt.step()
    sched.step()
    save_checkpoint({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "c.pt")
    state = load_checkpoint(tmp_path / "c.pt")
    fresh = make_optimizer(model, optimizer, 0.01, 1e-4, 0.9)
    fresh.load_state_dict(state["optimizer"])
    make_schedule(fresh, schedule, 0.01, 3, 5).load_state_dict(state["scheduler"])
    assert isinstance(state["torch_version"], str)


def test_weight_decay_skips_biases_and_norms():
    model = build_model("cnn", (1, 8, 8), 10)
    groups = make_optimizer(model, "adamw", 1e-3, 0.05, 0.9).param_groups
    assert groups[0]["weight_decay"] == 0.05 and all(p.dim() > 1 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.dim() == 1 for p in groups[1]["params"])


def test_foreign_checkpoint_files_are_rejected(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    for name in ("other.pt", "garbage.pt", "absent.pt"):
        with pytest.raises(TrainerError):
            load_checkpoint(tmp_path / name)

"""The first hour of a new user, each item against the real thing: a real server on loopback, the
``tensorwire`` script in its own interpreter, a client-only environment built from the real packages.

* a port already in use: one line naming it and the option to change it, non-zero exit;
* ``pip install tensorwire`` without extras: ``serve``/``fit`` say which extra to install;
* token auth on: ``tensorwire health`` still answers through the open gRPC health service;
* ``health -m BAD`` says why; ``tensorwire index | load | unload``;
* ``tensorwire metadata | head``: no BrokenPipeError traceback.
"""

from __future__ import annotations

import json
import os
import site
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_models import small_repo
from model_factory import write_config
from serving import RunningServer, free_port, running_server

from tensorwire.client import InferenceClient, UnavailableError

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "first-hour-token"


def tensorwire(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tensorwire.cli", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """``identity`` (FP32 [-1, 16]) and ``broken``: a config with an unknown key, so never READY (the
    servers below use --no-strict-readiness, so the server is ready while ``broken`` is not)."""
    repo = small_repo(tmp_path_factory.mktemp("first") / "models")
    write_config(repo, "broken", {"backend": "onnxruntime", "max_batch_size": 4, "max_batch": 8})
    (repo / "broken" / "1").mkdir()
    return repo


@pytest.fixture(scope="module")
def server(repo) -> Iterator[RunningServer]:
    with running_server(repo, "--drain-seconds", "0", "--no-strict-readiness", wait=False) as running:
        with InferenceClient(running.address) as client:
            try:
                client.wait_until_ready("identity", timeout=90)
            except UnavailableError:
                raise RuntimeError(f"server did not come up:\n{running.log()}") from None
        yield running


@pytest.fixture(scope="module")
def token_server(repo, tmp_path_factory) -> Iterator[RunningServer]:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    with running_server(
        repo, "--auth-token-file", str(token_file), "--drain-seconds", "0", "--no-strict-readiness", wait=False
    ) as running:
        with InferenceClient(running.address, token=TOKEN) as client:
            try:
                client.wait_until_ready("identity", timeout=90)
            except UnavailableError:
                raise RuntimeError(f"server did not come up:\n{running.log()}") from None
        yield running


# ------------------------------------------------------------------ ports


@pytest.mark.parametrize("which", ["--grpc-port", "--metrics-port"])
def test_a_port_in_use_is_one_line_naming_it(repo, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--grpc-port": str(free_port()), "--metrics-port": "0", which: str(port)}
        args = [f"{flag}={value}" for flag, value in ports.items()]
        done = tensorwire("serve", "--repo", str(repo), "--host", "127.0.0.1", *args, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "already in use" in lines[0] and which in lines[0]


# ------------------------------------------------------- client-only install


@pytest.fixture(scope="module")
def client_only(tmp_path_factory) -> dict[str, str]:
    """An environment holding only what ``pip install tensorwire`` installs: grpcio, protobuf, numpy
    (symlinked from this environment's site-packages) and tensorwire itself; ``python -S`` keeps
    every other package out of reach."""
    site_dir = Path(next(p for p in site.getsitepackages() if Path(p, "grpc").is_dir()))
    path = tmp_path_factory.mktemp("client-only")
    for name in ("grpc", "google", "numpy", "numpy.libs", "typing_extensions.py"):
        if (site_dir / name).exists():
            (path / name).symlink_to(site_dir / name)
    (path / "tensorwire").symlink_to(ROOT)
    return {**os.environ, "PYTHONPATH": str(path)}


def client_only_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-S", "-m", "tensorwire.cli", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_the_client_only_environment_really_lacks_the_extras(client_only):
    probe = "import importlib.util as u; print([m for m in ('onnxruntime', 'torch', 'grpc_health') if u.find_spec(m)])"
    done = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, env=client_only)
    assert done.stdout.strip() == "[]", done.stderr


def test_a_client_only_install_names_the_extra_to_install(client_only):
    usage = client_only_run(client_only, "--help")
    assert usage.returncode == 0, usage.stderr
    ready, _, absent = usage.stdout.partition("not installed here:")
    listed = {line.split()[0] for line in ready.splitlines() if line.startswith("  ")}
    assert {"infer", "health", "metadata", "index", "load", "unload"} <= listed and not {"serve", "fit"} & listed
    # the README's Install command (tensorwire is on no package index: 'tensorwire[server]' finds nothing)
    assert "  serve " in absent and "pip install -c constraints.txt '.[server]'" in absent
    assert "  fit " in absent and "pip install -c constraints.txt '.[train]'" in absent
    assert "tensorwire[" not in usage.stdout
    for command, extra in (("serve", "server"), ("fit", "train"), ("train", "train")):
        done = client_only_run(client_only, command, "--repo", "models")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and f"pip install -c constraints.txt '.[{extra}]'" in done.stderr
    unreachable = client_only_run(client_only, "health", "-a", f"127.0.0.1:{free_port()}", "--retries", "1")
    assert unreachable.returncode == 2 and "Traceback" not in unreachable.stderr  # the client itself works


# ------------------------------------------------------------------ health


def test_health_without_the_token_uses_the_open_health_service(token_server):
    address = ["-a", token_server.address, "--retries", "1"]
    done = tensorwire("health", *address, "-m", "identity")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "live=yes ready=yes" in done.stdout and "model identity: ready=yes" in done.stdout
    assert "grpc.health.v1" in done.stderr and "was not given" in done.stderr
    wrong = tensorwire("health", *address, "-m", "identity", "--token", "wrong", "--json")
    report = json.loads(wrong.stdout)
    assert wrong.returncode == 0 and report["checked_with"] == "grpc.health.v1" and "was refused" in report["note"]
    unknown = tensorwire("health", *address, "-m", "nope")
    assert unknown.returncode == 1 and "model nope: ready=no (not known to the server)" in unknown.stdout
    right = tensorwire("health", *address, "-m", "identity", "--token", TOKEN, "--json")
    assert right.returncode == 0 and json.loads(right.stdout)["checked_with"] == "v2" and not right.stderr


def test_health_says_why_a_model_is_not_ready(server):
    done = tensorwire("health", "-a", server.address, "-m", "broken", "-m", "identity")
    assert done.returncode == 1, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("model broken:"))
    assert "ready=no (" in line and "UNAVAILABLE" in line and "max_batch" in line, line  # the config error
    assert "model identity: ready=yes" in done.stdout


def test_health_exit_codes(server):
    assert tensorwire("health", "-a", server.address).returncode == 0
    assert tensorwire("health", "-a", server.address, "-m", "nope").returncode == 1
    gone = tensorwire("health", "-a", f"127.0.0.1:{free_port()}", "--retries", "1", "--timeout", "3")
    assert gone.returncode == 2 and "UNAVAILABLE" in gone.stderr


# --------------------------------------------------------- index, load, unload


def test_index_load_and_unload(server):
    address = ["-a", server.address]
    rows = json.loads(tensorwire("index", *address, "--json").stdout)
    states = {row["name"]: row for row in rows}
    assert states["identity"]["state"] == "READY" and states["broken"]["state"] == "UNAVAILABLE"
    assert "max_batch" in states["broken"]["reason"]
    table = tensorwire("index", *address)
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == ["MODEL", "VERSION", "STATE", "REASON"]
    unloaded = tensorwire("unload", *address, "identity")
    assert unloaded.returncode == 0 and unloaded.stdout.strip() == "unloaded identity", unloaded.stderr
    assert tensorwire("health", *address, "-m", "identity").returncode == 1
    loaded = tensorwire("load", *address, "identity", "broken")
    assert loaded.returncode == 1 and "loaded identity" in loaded.stdout
    assert "tensorwire load: broken:" in loaded.stderr and "max_batch" in loaded.stderr
    assert tensorwire("health", *address, "-m", "identity").returncode == 0


# ------------------------------------------------------------ closed stdout


def test_a_closed_stdout_ends_quietly(server):
    """``tensorwire metadata | head``: the reader is gone before the JSON is written."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorwire.cli", "metadata", "-a", server.address, "--index"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.close()  # long before the client has connected and written anything
    _, err = process.communicate(timeout=60)
    assert process.returncode == 141 and "Traceback" not in err and "BrokenPipeError" not in err, err


def test_help_texts_say_what_is_true():
    """``serve --help`` shows a default only where there is one (never ``(default: None)``, none for the
    required --repo, one per option); ``tensorwire --help`` says serve speaks gRPC and HTTP."""
    from tensorwire.server.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text
    assert "(default: a quarter of the memory limit) (default:" not in text
    repo_help = text.split("--repo REPO", 1)[1].split(" --", 1)[0]
    assert "default" not in repo_help
    assert "(default: 8000)" in text  # real defaults are still shown
    usage = subprocess.run(
        [sys.executable, "-m", "tensorwire.cli", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    (serve,) = [line for line in usage.splitlines() if line.strip().startswith("serve ")]
    assert "gRPC and HTTP" in serve

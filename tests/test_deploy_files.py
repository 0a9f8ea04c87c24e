"""The files to deploy with (Dockerfiles, Kubernetes manifests, KServe resources) checked offline.

No Docker engine or cluster runs here, so each file is checked against the authority for its format:
Kubernetes objects against Kubernetes' own OpenAPI schemas (``kubernetes-validate``, strict: unknown
fields fail), Dockerfiles with Docker's own parser (the ``dockerfile`` package wraps buildkit's), the
KServe resources for the fields KServe requires. Every container command line is parsed by the real
``tensorwire serve`` argument parser, the Docker health check is run against a real server, and the
Dockerfiles' install steps must be the commands README gives.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import dockerfile
import kubernetes_validate
import pytest
import yaml
from model_factory import onnx_identity
from serving import running_server

from tensorwire.server.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "deploy" / "Dockerfile.gpu"]
KUBERNETES = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KSERVE = ROOT / "deploy" / "kserve"
#: Kubernetes versions the manifests must be valid for: the native gRPC probe is GA since 1.27.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def serve_args(args: list[str]):
    """Parse a container's arguments (``serve ...``) with the real ``tensorwire serve`` parser."""
    assert args[0] == "serve", args
    return build_parser().parse_args(args[1:])


def instructions(path: Path) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(path)))


def final_stage(path: Path) -> list[dockerfile.Command]:
    commands = instructions(path)
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return commands[last_from:]


def only(commands: list[dockerfile.Command], name: str) -> dockerfile.Command:
    found = [c for c in commands if c.cmd == name]
    assert len(found) == 1, (name, found)
    return found[0]


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    assert f"\n## {title}\n" in text, f"README has no '## {title}' section"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


# ------------------------------------------------------------------ Kubernetes


def test_there_are_manifests():
    kinds = sorted(doc["kind"] for path in KUBERNETES for doc in documents(path))
    assert kinds == ["Deployment", "PersistentVolumeClaim", "PodDisruptionBudget", "Service"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", KUBERNETES, ids=lambda p: p.name)
def test_manifests_follow_kubernetes_schemas(path, version):
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_catches_mistakes():
    """Guard: strict validation really rejects a misspelled field and a wrong type."""
    deployment = next(d for d in documents(ROOT / "deploy/kubernetes/tensorwire.yaml") if d["kind"] == "Deployment")
    for mistake in ("typo", "type"):
        broken = copy.deepcopy(deployment)
        container = broken["spec"]["template"]["spec"]["containers"][0]
        if mistake == "typo":
            container["livenesProbe"] = container.pop("livenessProbe")
        else:
            container["ports"][0]["containerPort"] = "8001"
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_deployment_matches_the_server_it_runs():
    docs = {d["kind"]: d for d in documents(ROOT / "deploy/kubernetes/tensorwire.yaml")}
    pod = docs["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = serve_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    assert ports == expected == {"http": 8000, "grpc": 8001, "metrics": 8002}
    # probes: native gRPC probes on the gRPC port, liveness "" (live while loading and draining) and
    # readiness on the inference service
    assert container["startupProbe"]["grpc"] == {"port": args.grpc_port, "service": ""}
    assert container["livenessProbe"]["grpc"] == {"port": args.grpc_port, "service": ""}
    assert container["readinessProbe"]["grpc"] == {"port": args.grpc_port, "service": "inference.GRPCInferenceService"}
    # the kubelet waits for the whole drain: readiness flips, drain window, then accepted work finishes
    assert pod["spec"]["terminationGracePeriodSeconds"] >= args.drain_seconds + args.grace_seconds + 5
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < args.drain_seconds  # seen while draining
    # metrics scraped where they are served
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == args.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"
    # the repository is a volume mounted where --repo points; resources are requested; not root
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert str(args.repo) in mounts and mounts[str(args.repo)]["readOnly"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] and pod["spec"]["securityContext"]["runAsUser"] != 0
    # the Service reaches the named ports
    service_ports = {p["name"]: p["targetPort"] for p in docs["Service"]["spec"]["ports"]}
    assert service_ports == {"http": "http", "grpc": "grpc", "metrics": "metrics"}
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


# ------------------------------------------------------------------ KServe


def test_serving_runtime_has_what_kserve_requires():
    (runtime,) = documents(KSERVE / "servingruntime.yaml")
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    spec = runtime["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    formats = spec["supportedModelFormats"]
    assert all(f["name"] and isinstance(f["version"], str) for f in formats)
    assert any(f["name"] == "onnx" and f["autoSelect"] for f in formats)
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe's controller looks for
    args = serve_args(container["args"])
    assert str(args.repo) == "/mnt/models"  # where KServe's storage initializer puts storageUri
    # v2 REST on KServe's default port (8080), declared as the one serving port (Knative allows one)
    assert args.http_port == 8080
    assert container["ports"] == [{"name": "http1", "containerPort": args.http_port, "protocol": "TCP"}]
    # HTTP probes on the serving port: liveness and readiness mean different things
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": args.http_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": args.http_port}
    assert int(spec["annotations"]["prometheus.kserve.io/port"]) == args.metrics_port
    # The container is a Kubernetes container: validate it inside a Pod against Kubernetes' schemas.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": {"containers": [container]}}
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize(
    ("file", "protocol"), [("inferenceservice.yaml", "v2"), ("inferenceservice-grpc.yaml", "grpc-v2")]
)
def test_inference_service_uses_the_runtime(file, protocol):
    (runtime,) = documents(KSERVE / "servingruntime.yaml")
    (service,) = documents(KSERVE / file)
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert service["metadata"]["name"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] == protocol and protocol in runtime["spec"]["protocolVersions"]
    assert re.match(r"^(pvc|s3|gs|https?)://", model["storageUri"])
    args = serve_args(runtime["spec"]["containers"][0]["args"])
    if protocol == "grpc-v2":  # KServe routes HTTP/2 to the port named h2c: the runtime's gRPC port
        assert model["ports"] == [{"name": "h2c", "containerPort": args.grpc_port, "protocol": "TCP"}]
    else:  # v2 REST goes to the runtime's declared port
        assert "ports" not in model


# ------------------------------------------------------------------ Docker


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_the_server_as_it_should(path):
    stage = final_stage(path)
    user = only(stage, "USER").value[0]
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user), f"numeric non-root USER (Kubernetes runAsNonRoot): {user}"
    entrypoint = only(stage, "ENTRYPOINT")
    assert entrypoint.json and entrypoint.value[:3] == ("tini", "--", "tensorwire")  # exec form: signals reach it
    command = only(stage, "CMD")
    assert command.json
    args = serve_args(list(command.value))
    volume = only(stage, "VOLUME")
    assert volume.value == (str(args.repo),)
    assert set(only(stage, "EXPOSE").value) == {str(args.http_port), str(args.grpc_port), str(args.metrics_port)}
    health = only(stage, "HEALTHCHECK")
    assert health.value[0] == "CMD" and health.value[1:3] == ("tensorwire", "health")
    assert any(re.fullmatch(r"--start-period=\d+s", flag) for flag in health.flags)


def test_the_gpu_extra_is_the_server_extra_with_onnxruntime_gpu():
    """The GPU image installs ``server-gpu`` (its EXTRAS build argument): everything the ``server`` extra
    has (GPU metrics' nvidia-ml-py included), with onnxruntime-gpu in place of onnxruntime."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert _build_args(ROOT / "deploy" / "Dockerfile.gpu")["EXTRAS"] == "server-gpu"
    cpu = {re.split(r"[<>=\[]", r)[0]: r for r in extras["server"]}
    gpu = {re.split(r"[<>=\[]", r)[0]: r for r in extras["server-gpu"]}
    assert "nvidia-ml-py" in gpu
    assert gpu.pop("onnxruntime-gpu").removeprefix("onnxruntime-gpu") == cpu.pop("onnxruntime").removeprefix(
        "onnxruntime"
    )
    assert gpu == cpu


def _build_args(path: Path) -> dict[str, str]:
    return dict(c.value[0].split("=", 1) for c in final_stage(path) if c.cmd == "ARG" and "=" in c.value[0])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_install_steps_are_the_readme_commands(path):
    install = readme_section("Install")
    pip_steps = [c for c in instructions(path) if c.cmd == "RUN" and "pip " in c.value[0]]
    assert len(pip_steps) == 2, pip_steps  # build the wheel, install it
    defaults = _build_args(path)
    for step in pip_steps:
        command = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), step.value[0])
        assert command in install, f"{path.name} runs `{command}`, which README's Install section does not give"


def test_docker_health_check_command_passes_against_a_real_server(tmp_path):
    """The HEALTHCHECK command exits 0 against a ready server (address pointed at the test's port)."""
    health = only(final_stage(DOCKERFILES[0]), "HEALTHCHECK").value[1:]
    onnx_identity(tmp_path / "models", "identity", max_batch_size=4)
    with running_server(tmp_path / "models") as server:
        argv = list(health[1:])
        argv[argv.index("--address") + 1] = server.address
        done = subprocess.run(
            [sys.executable, "-m", "tensorwire.cli", *argv], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "tensorwire.cli", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0  # nothing listens there any more: unhealthy


def test_kserve_probe_paths_answer_on_a_real_server(tmp_path):
    """The runtime's HTTP probes, sent to a real server's HTTP port: 200 once ready."""
    (runtime,) = documents(KSERVE / "servingruntime.yaml")
    container = runtime["spec"]["containers"][0]
    onnx_identity(tmp_path / "models", "identity", max_batch_size=4)
    with running_server(tmp_path / "models", http=True) as server:
        for probe in ("livenessProbe", "readinessProbe"):
            path = container[probe]["httpGet"]["path"]
            with urllib.request.urlopen(f"http://{server.http_address}{path}", timeout=10) as answer:
                assert answer.status == 200, probe


def test_dockerignore_keeps_environments_out_of_the_build():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "models"} <= set(ignored)


# ------------------------------------------------------------------ installing from a clone


def test_a_wheel_builds_from_the_clone(tmp_path):
    """README's 'install from a clone': the wheel carries every package and no tests."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "src"
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            ".",
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("tensorwire-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("client", "server", "server/backends", "proto", "repository", "trainer", "loadtest"):
        assert f"tensorwire/{package}/__init__.py" in names, package
    assert "tensorwire/proto/inference.proto" in names and "tensorwire/cli.py" in names
    assert not any(n.startswith(("tensorwire/tests", "tests/", "tensorwire/deploy")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Provides-Extra: server-gpu" in metadata and "Provides-Extra: server" in metadata

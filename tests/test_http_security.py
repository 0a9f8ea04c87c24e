"""The HTTP front-end under the gRPC port's rules: bearer token (refused before the body is read, health
open), message size limit and the in-flight memory budget, TLS; each refusal counted like gRPC's."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import requests
from client_models import make_certificates
from model_factory import onnx_identity, sleeper_model
from serving import running_server

from tensorwire.server.http_frontend import LINGER_S

TOKEN = "http-s3cret"
BODY = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def refused_count(server, method: str, reason: str) -> float:
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("tensorwire_request_refused_total{") and f'method="{method}"' in line:
            if f'reason="{reason}"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def gauge(server, name: str) -> float:
    """The value of the unlabelled metric ``name`` (0 when absent)."""
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("http-auth")
    (base / "token").write_text(TOKEN)
    repo = base / "models"
    onnx_identity(repo, "identity", dims=[4], max_batch_size=4, warmup="none")
    with running_server(
        repo, "--auth-token-file", str(base / "token"), "--drain-seconds", "0", http=True, wait=False
    ) as server:
        url = f"http://{server.http_address}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/v2/health/ready", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        yield server


def test_the_token_is_required_except_for_health(token_server):
    url = f"http://{token_server.http_address}"
    assert requests.get(url + "/v2/health/live", timeout=5).status_code == 200
    assert requests.get(url + "/v2/health/ready", timeout=5).status_code == 200
    before = refused_count(token_server, "ModelInfer", "unauthenticated")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = requests.post(url + "/v2/models/identity/infer", json=BODY, headers=headers, timeout=5)
        assert response.status_code == 401 and "bearer token" in response.json()["error"]
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert refused_count(token_server, "ModelInfer", "unauthenticated") == before + 3
    assert requests.get(url + "/v2", timeout=5).status_code == 401
    assert requests.get(url + "/v2/models/identity/ready", timeout=5).status_code == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    answer = requests.post(url + "/v2/models/identity/infer", json=BODY, headers=good, timeout=5)
    assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [1, 2, 3, 4]


def test_an_unauthenticated_body_is_never_read(token_server):
    """256 MiB announced: the 401 comes on the headers, before a byte of the body is sent, and what the
    client sends anyway is discarded (never held), until the server closes the connection."""
    rss_before = psutil.Process(token_server.pid).memory_info().rss
    with socket.create_connection(("127.0.0.1", token_server.http_port), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 268435456\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            assert data, "the server closed the connection without answering"
            answer += data
        assert answer.startswith(b"HTTP/1.1 401") and b"Connection: close" in answer
        sent, chunk = 0, b"\0" * 2**20
        try:
            for _ in range(64):
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # the server closed the connection
            pass
    grown = psutil.Process(token_server.pid).memory_info().rss - rss_before
    assert grown < 32 * 2**20, f"the server grew {grown / 2**20:.0f} MiB for a refused call ({sent} bytes sent)"
    assert requests.get(f"http://{token_server.http_address}/v2/health/live", timeout=5).ok


def test_size_limit_and_memory_budget(tmp_path):
    repo = tmp_path / "models"
    sleeper_model(repo, max_batch_size=4, dynamic_batching={"max_queue_delay_us": 0})
    limit = 2_000_000
    with running_server(repo, "--max-inflight-bytes", str(limit), "--drain-seconds", "0", http=True) as server:
        url = f"http://{server.http_address}/v2/models/sleeper/infer"

        def body(ident: int, sleep_ms: float, pad: int) -> bytes:
            return json.dumps(
                {
                    "id": str(ident),
                    "inputs": [
                        {"name": "ID", "datatype": "INT64", "shape": [1, 1], "data": [ident]},
                        {"name": "SLEEP_MS", "datatype": "FP32", "shape": [1, 1], "data": [sleep_ms]},
                    ],
                    "parameters": {"pad": "x" * pad},
                }
            ).encode()

        # larger than the largest message (capped at the budget): 413, unread
        too_large = requests.post(url, data=body(1, 0, limit + 10), timeout=10)
        assert too_large.status_code == 413 and "--max-message-bytes" in too_large.json()["error"]
        # two slow requests of 0.9 MB hold 1.8 MB: a third does not fit
        results: dict[int, requests.Response] = {}

        def send(ident: int) -> None:
            results[ident] = requests.post(url, data=body(ident, 2500, 900_000), timeout=30)

        slow = [threading.Thread(target=send, args=(i,)) for i in (1, 2)]
        for thread in slow:
            thread.start()
        deadline = time.monotonic() + 60
        while gauge(server, "tensorwire_inflight_bytes") < 1_800_000:  # both slow requests are held
            assert time.monotonic() < deadline, "the two slow requests were never held together"
            time.sleep(0.05)
        third = requests.post(url, data=body(3, 0, 900_000), timeout=30)
        for thread in slow:
            thread.join()
        assert third.status_code == 429 and "memory budget" in third.json()["error"]
        assert [results[i].status_code for i in (1, 2)] == [200, 200]
        assert refused_count(server, "ModelInfer", "memory_budget") == 2
        # everything was given back: the next request is served
        assert requests.post(url, data=body(4, 0, 900_000), timeout=30).status_code == 200


def test_tls_only_and_the_plain_port_is_gone(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    repo = tmp_path / "models"
    onnx_identity(repo, "identity", dims=[4], max_batch_size=4, warmup="none")
    tls = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    with running_server(repo, *tls, "--drain-seconds", "0", http=True, wait=False) as server:
        url = f"https://localhost:{server.http_port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/v2/health/ready", verify=str(certs.ca), timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        answer = requests.post(url + "/v2/models/identity/infer", json=BODY, verify=str(certs.ca), timeout=10)
        assert answer.status_code == 200
        np.testing.assert_array_equal(answer.json()["outputs"][0]["data"], [1, 2, 3, 4])
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://localhost:{server.http_port}/v2/health/live", timeout=5)


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port"])
def test_a_port_already_taken_is_one_line_and_exit_1(tmp_path, flag):
    repo = tmp_path / "models"
    onnx_identity(repo, "identity", dims=[4], max_batch_size=4, warmup="none")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"--http-port": "0", "--grpc-port": "0", "--metrics-port": "0", flag: port}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tensorwire.cli",
                "serve",
                "--repo",
                str(repo),
                "--host",
                "127.0.0.1",
                *[part for item in ports.items() for part in item],
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    assert f"tensorwire serve: error: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert f"choose another port with {flag}" in done.stderr
    assert "Traceback" not in done.stderr


def _exchange(port: int, request: bytes, hang_up: bool = False) -> bytes:
    """Send raw bytes on a new connection; the status line of the answer (b"" when ``hang_up`` closes first
    or the server closed without answering)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        if hang_up:
            return b""
        answer = b""
        try:
            while b"\r\n" not in answer:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass
        return answer.split(b"\r\n", 1)[0]


def test_bodies_a_client_breaks_are_one_rate_limited_line_and_no_traceback(token_server):
    """Compressed garbage (refused unread: never decompressed), malformed chunks, bodies cut short and
    connections dropped mid-body, each sent 3 times: the right status, no ERROR or traceback in the log, at
    most one ``bad_http_request`` line per rate-limit interval, and the server keeps serving."""
    port, auth = token_server.http_port, f"Authorization: Bearer {TOKEN}\r\n".encode()
    infer, index = b"/v2/models/identity/infer", b"/v2/repository/index"

    def post(path: bytes, headers: bytes, body: bytes) -> bytes:
        return b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + headers + body

    compressed = b"Content-Length: 2\r\n\r\nxx"
    chunked = b"Transfer-Encoding: chunked\r\n\r\n"
    answered = [
        (post(infer, auth + b"Content-Encoding: gzip\r\n", compressed), b"415"),
        (post(infer, auth + b"Content-Encoding: deflate\r\n", compressed), b"415"),
        (post(index, auth + b"Content-Encoding: gzip\r\n", compressed), b"415"),
        (post(infer, b"Content-Encoding: gzip\r\n", compressed), b"401"),
        (post(b"/v2/health/ready", b"Content-Encoding: gzip\r\n", compressed), b"405"),
        (post(b"/v2/health/ready", b"Content-Encoding: deflate\r\n", compressed), b"405"),
        (post(infer, auth + chunked, b"zz\r\nab\r\n0\r\n\r\n"), b"400"),
        (post(infer, auth + chunked, b'4\r\n{"in\r\nzz\r\nab\r\n0\r\n\r\n'), b"400"),
        (post(index, auth + chunked, b'4\r\n{"re\r\nzz\r\nab\r\n0\r\n\r\n'), b"400"),
    ]
    dropped = [
        post(infer, auth + chunked, b'4\r\n{"in\r\n'),
        post(infer, auth + b"Content-Length: 1000\r\n\r\n", b'{"in'),
        post(index, auth + b"Content-Length: 1000\r\n\r\n", b'{"re'),
        post(infer, auth + b"Content-Encoding: gzip\r\n", compressed),
    ]
    log_before = len(token_server.log())
    started = time.monotonic()
    for _ in range(3):
        for request, status in answered:
            assert _exchange(port, request).split(b" ")[1:2] == [status], request
        for request in dropped:
            _exchange(port, request, hang_up=True)
    elapsed = time.monotonic() - started
    good = {"Authorization": f"Bearer {TOKEN}"}
    answer = requests.post(
        f"http://{token_server.http_address}/v2/models/identity/infer", json=BODY, headers=good, timeout=10
    )
    assert answer.status_code == 200
    time.sleep(2 * LINGER_S)  # a refused request's connection is read (then closed) for at most LINGER_S
    log = token_server.log()[log_before:]
    assert "Traceback" not in log and "level=ERROR" not in log, log[-3000:]
    assert log.count("event=bad_http_request") <= 1 + int(elapsed // 10), log[-3000:]

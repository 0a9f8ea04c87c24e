"""TLS, mutual TLS and bearer tokens against servers configured for them (certificates made here)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
from client_models import Certificates, make_certificates, small_repo
from serving import RunningServer, running_server

from tensorwire.client import (
    AsyncInferenceClient,
    InferenceClient,
    RetryPolicy,
    TLSConfig,
    UnauthenticatedError,
    UnavailableError,
)
from tensorwire.client import cli as client_cli

ONE = {"INPUT0": np.ones((1, 16), np.float32)}
TOKEN = "s3cret-token"
QUICK = {"retry": RetryPolicy.disabled(), "timeout": 5}


def _wait(server: RunningServer, **client_kwargs) -> None:
    """The harness waits with a plaintext, token-less probe; these servers need ours."""
    with InferenceClient(f"localhost:{server.port}", **client_kwargs) as client:
        try:
            client.wait_until_ready("identity", timeout=90)
        except UnavailableError:
            raise RuntimeError(f"server did not come up:\n{server.log()}") from None


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, certs) -> Iterator[RunningServer]:
    """TLS (server certificate only) plus bearer-token auth."""
    base = tmp_path_factory.mktemp("tls")
    (base / "token").write_text(TOKEN + "\n")
    repo = small_repo(base / "models")
    with running_server(
        repo,
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        "--auth-token-file",
        str(base / "token"),
        "--drain-seconds",
        "0",
        wait=False,
    ) as server:
        _wait(server, tls=TLSConfig(ca_file=certs.ca), token=TOKEN)
        yield server


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, certs) -> Iterator[RunningServer]:
    """Mutual TLS: clients must present a certificate signed by the test CA."""
    repo = small_repo(tmp_path_factory.mktemp("mtls") / "models")
    with running_server(
        repo,
        "--tls-cert",
        str(certs.server_cert),
        "--tls-key",
        str(certs.server_key),
        "--tls-client-ca",
        str(certs.ca),
        "--drain-seconds",
        "0",
        wait=False,
    ) as server:
        _wait(server, tls=TLSConfig(certs.ca, certs.client_cert, certs.client_key))
        yield server


def test_tls_with_the_right_ca_and_token(tls_server, certs):
    for host in ("localhost", "127.0.0.1"):  # the certificate names both
        tls = TLSConfig(ca_file=certs.ca)
        with InferenceClient(f"{host}:{tls_server.port}", tls=tls, token=TOKEN) as client:
            assert np.array_equal(client.infer("identity", ONE)["OUTPUT0"], ONE["INPUT0"])
            with client.stream("identity") as stream:
                assert stream.submit(ONE).result(timeout=10)["OUTPUT0"].shape == (1, 16)


def test_tls_server_name_override(tls_server, certs):
    tls = TLSConfig(ca_file=certs.ca, server_name="localhost")
    with InferenceClient(f"127.0.0.1:{tls_server.port}", tls=tls, token=TOKEN) as client:
        assert client.server_ready()


def test_tls_refuses_an_untrusted_server_and_plaintext(tls_server, certs):
    address = f"localhost:{tls_server.port}"
    with InferenceClient(address, tls=TLSConfig(ca_file=certs.other_ca), token=TOKEN, **QUICK) as client:
        with pytest.raises(UnavailableError):
            client.server_ready()
    with InferenceClient(address, token=TOKEN, **QUICK) as client, pytest.raises(UnavailableError):
        client.server_ready()


def test_missing_or_wrong_token_is_unauthenticated(tls_server, certs):
    tls = TLSConfig(ca_file=certs.ca)
    for token in (None, "wrong"):
        with InferenceClient(f"localhost:{tls_server.port}", tls=tls, token=token, **QUICK) as client:
            with pytest.raises(UnauthenticatedError) as info:
                client.infer("identity", ONE)
            assert "token" in info.value.details
            assert client.retries == 0
            with client.stream("identity") as stream:
                with pytest.raises(UnauthenticatedError):
                    stream.submit(ONE).result(timeout=10)


def test_async_client_with_tls_and_token(tls_server, certs):
    async def main() -> None:
        tls = TLSConfig(ca_file=certs.ca)
        async with AsyncInferenceClient(f"localhost:{tls_server.port}", tls=tls, token=TOKEN) as client:
            assert (await client.infer("identity", ONE))["OUTPUT0"].shape == (1, 16)
        async with AsyncInferenceClient(f"localhost:{tls_server.port}", tls=tls, **QUICK) as client:
            with pytest.raises(UnauthenticatedError):
                await client.server_ready()

    asyncio.run(main())


def test_mutual_tls(mtls_server, certs):
    address = f"localhost:{mtls_server.port}"
    with InferenceClient(address, tls=TLSConfig(certs.ca, certs.client_cert, certs.client_key)) as client:
        assert np.array_equal(client.infer("identity", ONE)["OUTPUT0"], ONE["INPUT0"])
    with InferenceClient(address, tls=TLSConfig(ca_file=certs.ca), **QUICK) as client:
        with pytest.raises(UnavailableError):  # the handshake fails without a client certificate
            client.server_ready()


def test_cli_speaks_tls_and_tokens(tls_server, certs, capsys):
    args = ["-a", f"localhost:{tls_server.port}", "--ca-file", str(certs.ca), "--token", TOKEN]
    assert client_cli.health([*args, "--model", "identity"]) == 0
    assert "ready=yes" in capsys.readouterr().out
    # Without the token the v2 API refuses; health falls back to the open grpc.health.v1 service.
    assert client_cli.health(["-a", f"localhost:{tls_server.port}", "--ca-file", str(certs.ca), "--retries", "1"]) == 0
    assert "grpc.health.v1" in capsys.readouterr().err

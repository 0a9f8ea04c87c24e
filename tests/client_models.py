"""Model repositories and helpers for the client SDK's tests (builders live in model_factory)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from model_factory import onnx_add_sub, onnx_identity, python_model, sleeper_model

from tensorwire.proto import codec
from tensorwire.proto.service import METHODS, SERVICE_NAME

#: Every v2 datatype, each served by an identity model named identity_<datatype lowercase>.
ALL_DATATYPES: tuple[str, ...] = codec.DATATYPES


def identity_name(datatype: str) -> str:
    return f"identity_{datatype.lower()}"


def client_repo(repo: Path) -> Path:
    """The repository most client tests run against.

    * ``identity``: FP32 [-1, 16] (the benchmark model), ``spare``: a second one to unload/load;
    * ``identity_<dt>``: one identity per datatype, [-1, 3];
    * ``add_sub``: two inputs, two outputs (output selection);
    * ``sleeper``: sleeps SLEEP_MS per execution (deadlines).
    """
    onnx_identity(repo, "identity", dims=[16], max_batch_size=8, warmup="none")
    onnx_identity(repo, "spare", dims=[4], max_batch_size=2, warmup="none")
    for datatype in ALL_DATATYPES:
        onnx_identity(repo, identity_name(datatype), datatype=datatype, dims=[3], max_batch_size=4,
                      warmup="none")
    onnx_add_sub(repo, "add_sub", max_batch_size=4, warmup="none")
    sleeper_model(repo, "sleeper", max_batch_size=4)
    bytes_echo(repo)
    return repo


BYTES_ECHO_SOURCE = """
class Model:
    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"].copy()}
"""


def bytes_echo(repo: Path, name: str = "bytes_echo") -> Path:
    """A Python-backend BYTES identity ([-1, -1]): arbitrary binary elements, not only UTF-8.

    (ONNX Runtime's string tensors hold text, so an ONNX identity cannot echo invalid UTF-8.)
    """
    return python_model(repo, name, BYTES_ECHO_SOURCE, {
        "max_batch_size": 4,
        "inputs": [{"name": "INPUT0", "datatype": "BYTES", "dims": [-1]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "BYTES", "dims": [-1]}],
        "warmup": "none",
    })


def small_repo(repo: Path) -> Path:
    """Just ``identity`` (FP32 [-1, 16]): for servers that exist to test connections."""
    onnx_identity(repo, "identity", dims=[16], max_batch_size=8, warmup="none")
    return repo


@dataclass
class Certificates:
    """PEM files for a test CA, a server certificate (localhost, 127.0.0.1) and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting only it must fail


def make_certificates(folder: Path) -> Certificates:
    """Generate everything with the ``cryptography`` package (EC P-256, valid for a day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(path: Path, private: ec.EllipticCurvePrivateKey) -> Path:
        path.write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))
        return path

    def write_cert(path: Path, cert: x509.Certificate) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def ca(common: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        private = key()
        cert = (
            x509.CertificateBuilder().subject_name(name(common)).issuer_name(name(common))
            .public_key(private.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ), critical=True)
            .sign(private, hashes.SHA256())
        )
        return private, cert

    def leaf(common: str, ca_key, ca_cert, usage, sans):
        private = key()
        builder = (
            x509.CertificateBuilder().subject_name(name(common)).issuer_name(ca_cert.subject)
            .public_key(private.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return private, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = ca("tensorwire test CA")
    server_key, server_cert = leaf(
        "localhost", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key, client_cert = leaf("test-client", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    _, other_cert = ca("someone else's CA")
    return Certificates(
        ca=write_cert(folder / "ca.pem", ca_cert),
        server_cert=write_cert(folder / "server.pem", server_cert),
        server_key=write_key(folder / "server.key", server_key),
        client_cert=write_cert(folder / "client.pem", client_cert),
        client_key=write_key(folder / "client.key", client_key),
        other_ca=write_cert(folder / "other-ca.pem", other_cert),
    )


def in_process_server(handlers: dict[str, Callable[..., Any]], port: int = 0) -> tuple[grpc.Server, int]:
    """A plain gRPC server on 127.0.0.1 serving some methods of the v2 service with ``handlers``.

    ``handlers`` maps method names (``"ModelInfer"``, ``"ModelStreamInfer"``) to behaviours
    written as gRPC servicer functions; methods not given answer UNIMPLEMENTED. For tests that
    must script exactly what a server does. Returns the started server and its port.
    """
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    methods = {}
    for name, behaviour in handlers.items():
        method = METHODS[name]
        methods[name] = kinds[(method.client_streaming, method.server_streaming)](
            behaviour,
            request_deserializer=method.request.FromString,
            response_serializer=method.response.SerializeToString,
        )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE_NAME, methods)])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound

"""Regenerate the committed Python modules from ``inference.proto``.

Run ``python -m tensorwire.proto.generate`` (needs the ``dev`` extra, which
pins ``grpcio-tools`` to the generator version the protobuf pin allows).
``--check`` regenerates into a temporary folder and exits 1 when the
committed files differ, which the test suite uses.

Only message modules (and ``.pyi`` stubs) are generated: the service is
registered under the standard ``inference.GRPCInferenceService`` path by
``tensorwire.proto.service``, not by a generated ``_grpc`` module, whose path
would carry our own package name.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("inference.proto",)
GENERATED = ("inference_pb2.py", "inference_pb2.pyi")


def generate_into(out_dir: Path) -> None:
    """Run protoc so that the modules import as ``tensorwire.proto.*``."""
    from grpc_tools import protoc  # dev-only dependency

    with tempfile.TemporaryDirectory() as staging:
        package_dir = Path(staging) / "tensorwire" / "proto"
        package_dir.mkdir(parents=True)
        for name in PROTO_FILES:
            shutil.copy(PROTO_DIR / name, package_dir / name)
        args = [
            "protoc",
            f"-I{staging}",
            f"--python_out={staging}",
            f"--pyi_out={staging}",
            *(f"tensorwire/proto/{name}" for name in PROTO_FILES),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for name in GENERATED:
            shutil.copy(package_dir / name, out_dir / name)


def differing_files() -> list[str]:
    """Names of committed generated files that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as fresh:
        generate_into(Path(fresh))
        return [
            name for name in GENERATED if (Path(fresh) / name).read_bytes() != (PROTO_DIR / name).read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed modules are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = differing_files()
        if stale:
            print("stale generated modules: " + ", ".join(stale), file=sys.stderr)
            return 1
        return 0
    generate_into(PROTO_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How the default digits models vary with the CPU's instruction set: the measurement behind the
accuracy margins of build-default-repo and of the trainer tests. A tool, not a test (takes minutes).

    .venv/bin/python tests/isa_matrix.py --seeds 0,1,2 --out .cache/isa_matrix.json

Training: the default recipe (tensorwire.trainer.default_repo.RECIPE, 2 DDP ranks) once per seed
under each instruction-set setting of PyTorch's three kernel libraries, which one machine can
force: ATen (ATEN_CPU_CAPABILITY), oneDNN (ONEDNN_MAX_CPU_ISA, the convolutions) and MKL
(MKL_ENABLE_INSTRUCTIONS). "avx2" reproduces, bit for bit, the weights an AVX2-only machine
trained (test accuracy 0.9814 for seed 0).

Serving: ONNX Runtime picks its kernels from CPUID and has no switch, so each model is also
evaluated under QEMU's user-mode emulator (``qemu-x86_64 -cpu Haswell``: AVX2 without AVX-512 or
VNNI; ``-cpu Nehalem``: SSE4.2) when ``qemu-x86_64`` is installed (Debian: apt-get install
qemu-user). Every model is quantized twice: with the default recipe (tensorwire.trainer.default_repo.QUANTIZE,
7-bit weights) and with 8-bit weights, to show what reduce_range protects against.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: Instruction-set settings for training, as environment variables read by torch's kernel libraries.
TRAIN_ISAS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "baseline": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    },
}

#: CPUs for ONNX Runtime: None = this machine; otherwise a QEMU CPU model.
SERVE_CPUS: dict[str, str | None] = {
    "native": None,
    "avx2 (qemu Haswell)": "Haswell",
    "sse4.2 (qemu Nehalem)": "Nehalem",
}


def train_one(run: Path, seed: int) -> None:
    """Fit the default recipe, export ONNX, quantize with the default recipe and with 8-bit weights."""
    from tensorwire.trainer.artifacts import splits_of
    from tensorwire.trainer.config import ExportOptions, FitOptions, QuantizeOptions
    from tensorwire.trainer.default_repo import QUANTIZE, RECIPE
    from tensorwire.trainer.export import export
    from tensorwire.trainer.launch import fit
    from tensorwire.trainer.quantize import _calibration_samples, quantize, quantize_static
    from tensorwire.trainer.runfolder import RunFolder, load_checkpoint

    fit(FitOptions(**{**RECIPE, "seed": seed}, run=str(run), nproc_per_node=2, overwrite=True, progress=False))
    export(ExportOptions(run=str(run), formats=["onnx"]))
    quantize(QuantizeOptions(run=str(run), **QUANTIZE))
    folder = RunFolder.at(run)
    splits = splits_of(load_checkpoint(folder.best))
    samples = _calibration_samples(splits.train.x, QUANTIZE["calibration_samples"], seed)
    quantize_static(folder.onnx, folder.export_dir / "model.int8_8bit.onnx", samples, True, reduce_range=False)
    np_save_test(folder.export_dir, splits.test.x, splits.test.y)


def np_save_test(folder: Path, x, y) -> None:
    import numpy as np

    np.savez(folder / "test_split.npz", x=x, y=y)


def evaluate(run: Path) -> dict[str, float]:
    """Test accuracy of the FP32 and both INT8 files with this CPU's ONNX Runtime kernels."""
    import numpy as np
    import onnxruntime as ort

    data = np.load(run / "export" / "test_split.npz")
    out: dict[str, float] = {}
    for name in ("model.onnx", "model.int8.onnx", "model.int8_8bit.onnx"):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(run / "export" / name), options, providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: data["x"]})[0]
        out[name] = float((logits.argmax(1) == data["y"]).mean())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (default: 0)")
    parser.add_argument("--work", default=".cache/isa_matrix", help="training runs go here")
    parser.add_argument("--out", default=None, help="write every number as JSON here")
    parser.add_argument("--train-one", nargs=2, metavar=("RUN", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", metavar="RUN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_one:
        train_one(Path(args.train_one[0]), int(args.train_one[1]))
        return 0
    if args.evaluate:
        print(json.dumps(evaluate(Path(args.evaluate))))
        return 0
    qemu = shutil.which("qemu-x86_64")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for isa, env in TRAIN_ISAS.items():
            run = Path(args.work) / f"{isa}-seed{seed}"
            subprocess.run(
                [sys.executable, __file__, "--train-one", str(run), str(seed)],
                env={**os.environ, **env},
                check=True,
                stdout=subprocess.DEVNULL,
            )
            for cpu, model in SERVE_CPUS.items():
                if model and not qemu:
                    continue
                prefix = [qemu, "-cpu", model] if model else []
                done = subprocess.run(
                    [*prefix, sys.executable, __file__, "--evaluate", str(run)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                acc = json.loads(done.stdout.strip().splitlines()[-1])
                row = {"seed": seed, "train_isa": isa, "serve_cpu": cpu, **acc}
                rows.append(row)
                print(
                    f"seed {seed}  trained {isa:<8}  served {cpu:<22}  FP32 {acc['model.onnx']:.4f}  "
                    f"INT8 {acc['model.int8.onnx']:.4f}  INT8 8-bit weights {acc['model.int8_8bit.onnx']:.4f}",
                    flush=True,
                )
    if not qemu:
        print("qemu-x86_64 not found: ONNX Runtime was measured on this CPU only (apt-get install qemu-user)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

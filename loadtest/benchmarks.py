"""The one generator of BENCHMARKS.md: ``make bench`` (all scenarios) or ``make bench ONLY=name[,name]``.

    python -m tensorwire.loadtest.benchmarks --out BENCHMARKS.md               # every scenario
    python -m tensorwire.loadtest.benchmarks --only bare-baseline              # one; the others keep their numbers
    python -m tensorwire.loadtest.benchmarks --list                            # what there is
    python -m tensorwire.loadtest.benchmarks --render-only                     # rewrite the file, measure nothing

It waits (up to ``--wait-idle`` seconds) for the 1-minute load average to fall below ``--max-load`` (client
and server share the machine's cores, so other work skews everything), runs the chosen scenarios of
:mod:`tensorwire.loadtest.scenarios` one after the other, stores each one's numbers as
``<workdir>/results/<name>.json``, then writes the markdown from every stored result, in registry order:
a scenario not run this time keeps the section of its last run; one never run says how to run it.

``--quick`` makes every chosen scenario a smoke run (short windows, fewer levels; marked as such in the
file). Exit status: 0 when every chosen scenario ran or was skipped for a missing tool, 1 when one failed
(its section says why; the others are still written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tensorwire.loadtest import _stats, report
from tensorwire.loadtest._cli import DefaultsOnceFormatter, names
from tensorwire.loadtest.harness import Context, Page, Skipped
from tensorwire.loadtest.scenarios import SCENARIOS  # the registry, filled

_GENERATOR = "python -m tensorwire.loadtest.benchmarks"


def log(text: str) -> None:
    print(f"benchmarks: {text}", file=sys.stderr, flush=True)


def wait_for_quiet(max_load: float, wait_s: float) -> tuple[float | None, float]:
    """Wait until the 1-minute load average is below ``max_load`` (at most ``wait_s``); (load, seconds waited)."""
    started = time.monotonic()
    load = _stats.load_average()
    while load is not None and load >= max_load and time.monotonic() - started < wait_s:
        left = wait_s - (time.monotonic() - started)
        log(f"load average {load:.2f} >= {max_load}: waiting for other work to finish ({left:.0f} s left)")
        time.sleep(min(30.0, max(1.0, left)))
        load = _stats.load_average()
    return load, time.monotonic() - started


def result_path(workdir: Path, name: str) -> Path:
    """Where a scenario's last numbers are kept."""
    return workdir / "results" / f"{name}.json"


def run_scenario(name: str, workdir: Path, quick: bool, progress: str, waited_s: float) -> dict[str, Any]:
    """Measure one scenario and store its record (numbers, or why it was skipped or failed); returns the record."""
    scenario = SCENARIOS[name]
    ctx = Context(workdir=workdir, quick=quick, progress=progress, log=log, scenario=name)
    record: dict[str, Any] = {
        "name": name,
        "title": scenario.title,
        "quick": quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": report.machine(),
        "load_average_start": _stats.load_average(),
        "waited_for_quiet_s": waited_s,
    }
    log(f"=== {name}: {scenario.title}")
    started = time.perf_counter()
    try:
        record["result"] = scenario.measure(ctx)
    except Skipped as why:
        record["skipped"] = str(why)
        log(f"{name}: skipped: {why}")
    except Exception as err:
        record["error"] = f"{type(err).__name__}: {err}"
        log(f"{name}: FAILED:\n{traceback.format_exc()}")
    record["duration_s"] = time.perf_counter() - started
    record["load_average_end"] = _stats.load_average()
    path = result_path(workdir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def _section(record: dict[str, Any] | None, name: str, page: Page) -> list[str]:
    scenario = SCENARIOS[name]
    lines = [f"## {scenario.title}", ""]
    if record is None:
        return [*lines, f"_Not measured yet: `make bench ONLY={name}`._"]
    loads = [record.get("load_average_start"), record.get("load_average_end")]
    meta = (
        f"Scenario `{name}` (`make bench ONLY={name}`), measured {record['started']} in "
        f"{record['duration_s'] / 60:.1f} min, load average {_load(loads[0])} → {_load(loads[1])}."
    )
    lines += [f"<sub>{meta}</sub>", ""]
    if record["quick"]:
        lines += ["> **Smoke run (`--quick`): short windows and few levels, not for numbers.**", ""]
    if "skipped" in record:
        return [*lines, f"_Skipped: {record['skipped']}_"]
    if "error" in record:
        return [*lines, f"_Failed: {record['error']}_ (log: `{_GENERATOR} --only {name}`)"]
    try:
        return [*lines, scenario.render(record["result"], page).strip()]
    except Exception as err:  # a stored result from an older layout: say so, keep the rest of the file
        return [*lines, f"_Cannot render the stored result ({type(err).__name__}: {err}): run it again._"]


def _load(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render(workdir: Path, out: Path) -> str:
    """BENCHMARKS.md from every stored result (see the module docstring)."""
    records = {}
    for name in SCENARIOS:
        path = result_path(workdir, name)
        if path.is_file():
            records[name] = json.loads(path.read_text())
    newest = max(records.values(), key=lambda r: r["started"], default=None)
    total = sum(s.minutes for s in SCENARIOS.values())
    lines = [
        "<!-- generated by `make bench` (python -m tensorwire.loadtest.benchmarks): change the scenarios in "
        "loadtest/scenarios.py or loadtest/benchmarks_notes.md, not this file -->",
        "",
        "# Benchmarks",
        "",
        "How fast is tensorwire, where is the knee, and what does each part of the request path cost? Each "
        "section below is one named scenario of the benchmark harness (`loadtest/scenarios.py`). `make bench` "
        f"runs them all (about {total:.0f} minutes on 2 cores, after waiting for the machine to be idle); "
        "`make bench ONLY=<name>` runs one and rewrites this file with the others' last numbers.",
        "",
    ]
    if newest is not None:
        lines += [f"**Machine** (newest run): {report.machine_markdown(newest['machine'])}.", ""]
    lines += ["| scenario | what it measures | measured | took |", "|---|---|---|---:|"]
    for name, scenario in SCENARIOS.items():
        record = records.get(name)
        when = "–" if record is None else record["started"] + (" (smoke run)" if record["quick"] else "")
        took = "–" if record is None else f"{record['duration_s'] / 60:.1f} min"
        lines.append(f"| `{name}` | {scenario.title} | {when} | {took} |")
    page = Page(out)
    for name in SCENARIOS:
        lines += ["", *_section(records.get(name), name, page)]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        "make bench                                   # every scenario, then this file",
        "make bench ONLY=bare-baseline                # one scenario",
        f"{_GENERATOR} --list       # the scenarios",
        "# one model, with a server of its own, unary calls and the stream side by side, the ceiling and a plot:",
        "tensorwire bench --repo .cache/benchmarks/models --model cnn --concurrency 1,8,32,64 \\",
        "    --ceiling --plot cnn.png --json cnn.json",
        "# locust against a running server (add --stream for the ModelStreamInfer fast path):",
        "locust -f loadtest/locustfile.py --headless -u 64 -r 64 -t 30s --host 127.0.0.1:8001 --model identity",
        "# the bare baseline server, for perf_analyzer or the SDK:",
        "python -m tensorwire.loadtest.bare_server --repo .cache/benchmarks/models --models identity,cnn --port 8011",
        "```",
        "",
    ]
    return "\n".join(lines)


def write(out: Path, text: str) -> None:
    """Replace ``out`` atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=out.parent, suffix=".md.tmp")
    with os.fdopen(handle, "w") as f:
        f.write(text)
    os.replace(tmp, out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_GENERATOR,
        formatter_class=DefaultsOnceFormatter,
        description="Run the named benchmark scenarios and write BENCHMARKS.md from their numbers.",
    )
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="markdown file to write")
    parser.add_argument(
        "--only",
        type=names,
        default=None,
        metavar="NAME[,NAME]",
        help="measure only these scenarios (default: all); the file keeps the others' last numbers",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--render-only", action="store_true", help="measure nothing: rewrite the file")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke runs: short windows, few levels (marked in the file; not for numbers)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".cache/benchmarks"),
        help="models, logs and stored results (reused by the next run)",
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=1.5,
        help="wait for the 1-minute load average to drop below this before measuring",
    )
    parser.add_argument("--wait-idle", type=float, default=600.0, help="the longest wait for that, seconds")
    parser.add_argument(
        "--progress",
        choices=["auto", "rich", "plain", "none"],
        default="plain",
        help="progress of the closed-loop levels",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.list:
        for name, scenario in SCENARIOS.items():
            needs = f"  [needs {', '.join(scenario.needs)}]" if scenario.needs else ""
            print(f"{name:<20} ~{scenario.minutes:g} min  {scenario.title}{needs}")
        return 0
    chosen = args.only or list(SCENARIOS)
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    workdir = args.workdir.resolve()
    failed = []
    if not args.render_only:
        _, waited = wait_for_quiet(args.max_load, args.wait_idle)
        for name in chosen:
            if "error" in run_scenario(name, workdir, args.quick, args.progress, waited):
                failed.append(name)
    write(args.out, render(workdir, args.out.resolve()))
    log(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

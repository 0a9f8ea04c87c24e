"""The BENCHMARKS.md generator and its named scenarios, end to end in their quick (smoke) form.

One run of ``python -m tensorwire.loadtest.benchmarks --quick`` over every scenario that measures serving
(the trainer's two are commands of another part; their mechanism is checked with a small command): real
reference models, real servers (tensorwire and the bare baseline), real perf_analyzer, locust and py-spy
processes. The numbers of a smoke run mean nothing; what is checked is that every scenario measures what
its section says, in the registry's order, and that one scenario can be measured alone.
"""

from __future__ import annotations

import json
import re

import pytest

from tensorwire.loadtest import benchmarks
from tensorwire.loadtest.harness import Context, Skipped, command_scenario
from tensorwire.loadtest.reference_models import build_identity
from tensorwire.loadtest.scenarios import MANY_CONNECTIONS_SERVERS, SCENARIOS

pytestmark = pytest.mark.slow

SERVING = [
    "closed-loop",
    "load-generators",
    "serving-time",
    "perf-analyzer",
    "bare-baseline",
    "many-connections",
    "http-frontend",
    "int8-served",
    "sdk-overhead",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    out, workdir = root / "B.md", root / "work"
    common = ["--out", str(out), "--workdir", str(workdir), "--wait-idle", "0", "--progress", "none"]
    assert benchmarks.main(["--quick", "--only", ",".join(SERVING), *common]) == 0
    records = {n: json.loads((workdir / "results" / f"{n}.json").read_text()) for n in SERVING}
    return {"out": out, "workdir": workdir, "common": common, "text": out.read_text(), "records": records}


def result(run, name: str) -> dict:
    record = run["records"][name]
    assert "error" not in record, record["error"]
    if "skipped" in record:
        pytest.skip(f"{name}: {record['skipped']}")
    assert record["quick"] is True
    return record["result"]


def test_every_scenario_has_its_section_in_order(run):
    text = run["text"]
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings == [s.title for s in SCENARIOS.values()] + ["Reproduce"]
    assert not any(re.search(r"\bissue\b", h, re.I) for h in headings)  # titles say what is measured
    assert text.count("Smoke run (`--quick`)") == len(SERVING)
    assert "_Not measured yet: `make bench ONLY=trainer-int8`._" in text
    for name in SERVING:
        assert f"| `{name}` |" in text and f"make bench ONLY={name}" in text


def test_closed_loop_batching_on_off_stream_and_ceiling(run):
    r = result(run, "closed-loop")
    series = {(x["series"], x["concurrency"]) for x in r["levels"]}
    assert series == {(s, c) for s in ("batching on", "batching off", "stream, batching on") for c in (1, 2)}
    assert all(x["errors"] == 0 and x["requests"] > 0 and x["efficiency"] > 0 for x in r["levels"])
    assert r["ceilings"]["identity"]["threads"] == 1 and len(r["ceilings"]["identity"]["rows"]) == 7
    assert (run["out"].with_suffix(".png")).read_bytes()[:4] == b"\x89PNG"
    assert "![throughput and p99 against concurrency, per model](B.png)" in run["text"]
    assert "| `identity` | 1 × 1 |" in run["text"]


def test_load_generators_unary_and_stream(run):
    rows = {row["generator"]: row for row in result(run, "load-generators")["rows"]}
    for name in (
        "`tensorwire bench --mode async`",
        "`tensorwire bench --mode stream`",
        "locust, 4 users, 1 process",
        "locust, 4 users, 1 process, `--stream`",
    ):
        assert "error" not in rows[name], rows[name]
        assert rows[name]["throughput_rps"] > 0
    assert rows["locust, 4 users, 1 process, `--stream`"]["failures"].startswith("0 of ")


def test_serving_time_cpu_and_profile(run):
    r = result(run, "serving-time")
    assert r["level"]["server_cpu_us_per_request"] > 0 and r["level"]["client_cpu_us_per_request"] > 0
    assert "top" in r["profile"] or "py-spy" in r["profile"]["error"]
    assert "### Reading the numbers" in run["text"]  # the hand-written notes come with it


def test_bare_baseline_measures_both_servers_the_same_way(run, perf_analyzer):
    r = result(run, "bare-baseline")
    levels = {(x["server"], x["model"], x["concurrency"], x["mode"]): x for x in r["rows"]}
    assert set(levels) == {
        (s, m, c, mode)
        for s in ("bare grpc.aio server", "tensorwire")
        for m in ("identity", "cnn")
        for c in (1, 4)
        for mode in ("unary", "stream")
    }
    for (server, *_), row in levels.items():
        assert "error" not in row, row
        assert row["throughput_rps"] > 0 and row["server_cpu_us_per_request"] > 0
        assert (row["server_avg_batch"] is None) == (server != "tensorwire")  # the baseline has no statistics
    targets = {t["name"]: t for t in r["targets"]}
    assert set(targets) == {
        "identity_unary_vs_bare",
        "identity_stream_vs_bare_unary",
        "cnn_unary_vs_ceiling",
        "cnn_stream_vs_ceiling",
        "identity_c1_p50",
        "cnn_c1_p50",
    }
    assert all(isinstance(t["met"], bool) for t in targets.values())


def test_many_connections_adds_up_several_processes(run, perf_analyzer):
    r = result(run, "many-connections")
    assert (r["processes"], r["concurrency"]) == (2, 2)
    assert [x["server"] for x in r["rows"]] == [s.label for s in MANY_CONNECTIONS_SERVERS]
    assert MANY_CONNECTIONS_SERVERS[0].label == "bare grpc.aio server"
    for row in r["rows"]:
        assert "error" not in row, row
        assert row["processes"] == 2 and row["throughput_rps"] > 0 and row["server_cpu_us_per_request"] > 0


def test_perf_analyzer_sweep_and_int8(run, perf_analyzer):
    r = result(run, "perf-analyzer")
    for model in ("identity", "cnn"):
        assert [x["concurrency"] for x in r["levels"][model]] == [1, 4]
        assert all("error" not in x and x["server_avg_batch"] >= 1 for x in r["levels"][model])
    assert {(x["threads"], x["batch_size"]) for x in r["in_process"]["ceiling"]} == {
        (t, b) for t in (1, 2) for b in (1, 2, 4, 8, 16, 32, 64)
    }
    assert [t["name"] for t in r["targets"]] == [
        "cnn_vs_2thread_ceiling",
        "identity_throughput",
        "identity_c1_latency",
        "cnn_c1_latency",
    ]
    int8 = result(run, "int8-served")
    assert [x["model"] for x in int8["served"]] == ["cnn", "cnn_int8"] and all("error" not in x for x in int8["served"])
    assert int8["file_bytes"]["cnn_int8"] < int8["file_bytes"]["cnn"] and int8["top1_agreement"] > 0.9
    assert [x["name"] for x in int8["ratios"]] == ["served", "in_process_batch1", "in_process_batch32"]


def test_sdk_overhead(run):
    r = result(run, "sdk-overhead")
    assert r["overhead"]["ratio"] > 0 and r["sync"]["stream"] > 0 and r["asyncio"]["unary"] > 0


def test_render_only_and_one_scenario_alone(run):
    before = {n: r["started"] for n, r in run["records"].items()}
    assert benchmarks.main(["--render-only", *run["common"]]) == 0
    assert run["out"].read_text() == run["text"]  # the same stored numbers, the same file
    assert benchmarks.main(["--quick", "--only", "sdk-overhead", *run["common"]]) == 0
    workdir = run["workdir"]
    after = {n: json.loads((workdir / "results" / f"{n}.json").read_text())["started"] for n in before}
    assert [n for n in before if after[n] != before[n]] in ([], ["sdk-overhead"])  # same second is possible
    results = workdir / "results"
    assert (results / "sdk-overhead.json").stat().st_mtime > (results / "closed-loop.json").stat().st_mtime


def test_list_and_unknown_names(capsys):
    assert benchmarks.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in SCENARIOS) and "needs perf_analyzer" in listed
    with pytest.raises(SystemExit) as stop:
        benchmarks.main(["--only", "no-such-scenario", "--render-only"])
    assert stop.value.code == 2


def test_command_scenario_takes_what_the_command_prints(tmp_path):
    model = tmp_path / "identity" / "1" / "model.onnx"
    build_identity(model)
    ctx = Context(workdir=tmp_path / "work", log=lambda _: None, scenario="table")
    args = ("--model", str(model), "--batch-sizes", "1,2", "--threads", "1", "--seconds", "0.02", "--repeats", "1")
    table = command_scenario("table", "A table", "tensorwire.loadtest.ceiling", args=args)
    result_ = table.measure(ctx)
    assert result_["markdown"].startswith("| model | threads |") and result_["markdown"].count("| identity |") == 2
    assert table.render(result_, None).startswith("Command: `python -m tensorwire.loadtest.ceiling --model ")
    with pytest.raises(Skipped, match="not part of this installation"):
        command_scenario("x", "X", "tensorwire.no_such_module").measure(ctx)
    with pytest.raises(RuntimeError, match="exited 2"):
        command_scenario("bad", "Bad", "tensorwire.loadtest.ceiling", args=("--batch-sizes", "0")).measure(ctx)

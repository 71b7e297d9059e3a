"""The performance suite (benchmarks/perf_suite.py) runs end to end on the tiniest model and writes
JSON and Markdown of the documented shape; a method whose requirements are not met is skipped with
the reason (a smoke test: no timing is checked)."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf_suite.py"


def _suite():
    spec = importlib.util.spec_from_file_location("perf_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["perf_suite"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_suite_writes_json_and_markdown(tiny_openclip, tmp_path):
    suite = _suite()
    argv = [
        "--quick", "--methods", "zeroshot,tda,dmn:shots=1", "--images", "3", "--classes", "5",
        "--scale-classes", "5,12", "--scale-views", "10", "--embedding-images", "8", "--out", str(tmp_path / "out"),
        "--work", str(tmp_path / "work"), "--workers", "0", "--silent",
    ]  # fmt: skip
    result = suite.main(argv, model=tiny_openclip)
    data = json.loads((tmp_path / "out" / "perf_suite.json").read_text())
    assert data["config"]["note"] == suite.WEIGHTS_NOTE and data["config"]["images"] == 3
    assert [m["method"] for m in data["methods"]] == ["zeroshot", "tda"]
    (skip,) = data["skipped"]  # few-shot DMN without a support set: requirements not met
    assert skip["method"] == "dmn" and skip["options"] == {"shots": 1} and "support" in skip["reason"]
    for m in data["methods"]:
        assert set(m["runs"]) == {"cold", "warm"}
        for state, run in m["runs"].items():
            assert run["images"] == 3 and run["images_per_s"] > 0 and run["peak_memory_mb"] > 0
            assert set(run["latency_ms"]) == {"median", "p90"} and run["ratio_to_zeroshot"] > 0
            assert run["passes"] == 2  # method and zero-shot took turns twice; the fastest pass is kept
            hits = run["cache"]["view_hits"]
            assert (hits == 0) if state == "cold" else (hits == 3 and run["gmacs_per_image"] == 0)
    assert {(r["method"], r["classes"]) for r in data["scaling"]["classes"]} == {
        (m, c) for m in ("zeroshot", "tda") for c in (5, 12)
    }
    assert [(r["method"], r["views"]) for r in data["scaling"]["views"]] == [("tda", 10)]  # zero-shot has no n_views
    assert {r["method"] for r in data["cached_embeddings"]["rows"]} >= {"zeroshot", "tda", "dmn", "zero"}
    assert data["encoder"]["encoder_views_per_s"] > 0
    md = (tmp_path / "out" / "perf_suite.md").read_text()
    for heading in ("| method | kind |", "number of classes", "number of views", "cached embeddings", "## Skipped"):
        assert heading in md
    assert result["config"]["suite_seconds"] >= 0

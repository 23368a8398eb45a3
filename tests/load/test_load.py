"""The load test in a small configuration: completions keep flowing and stay verified while
the trainer hot-loads a base and a chain of deltas, on 1 and 2 replicas."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def _load_test_module():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "load_test.py"
    spec = importlib.util.spec_from_file_location("weightsync_load_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


load_test = _load_test_module()


@pytest.mark.parametrize(
    ("replicas", "transition"),
    [(1, "async"), (2, "sync")],
    ids=["1-replica-async", "2-replicas-sync"],
)
def test_no_failed_or_corrupted_response_while_syncing(tmp_path, replicas, transition) -> None:
    cfg = load_test.LoadConfig(
        replicas=replicas, transition=transition, streams=3, num_deltas=2, max_tokens=6,
        before_s=1.0, gap_s=0.5, after_s=1.0, max_duration_s=180,
    )  # fmt: skip
    report = load_test.run_load_test(cfg, tmp_path)
    print(load_test.format_report(report))
    assert report["failed"] == 0, report["failures"]
    assert report["unnamed"] == 0, report["failures"]
    assert report["corrupted"] == 0, report["failures"]
    # The check has teeth: the snapshots' reference outputs differ, and the load overlapped
    # every swap.
    assert report["distinct_references"] >= 3
    assert [s["kind"] for s in report["swaps"]] == ["base", "delta", "delta"]
    assert report["latency"]["during"]["count"] > 0
    assert report["latency"]["before"]["count"] > 0 and report["latency"]["after"]["count"] > 0
    for swap in report["swaps"]:
        assert len(swap["pause_s"]) == replicas
        assert all(p >= 0 for p in swap["pause_s"].values())  # every replica reported it
    for check in report["served_checks"]:
        assert check["replicas_matching"] == check["replicas"] == replicas, check
    seen = {i for s in report["swaps"] for i in [s["identity"]]}
    assert seen == {c["identity"] for c in report["served_checks"]}


def test_soak_control_routes_and_hot_loads_answer_under_a_flood(tmp_path) -> None:
    """Concurrent long completions plus hot-loads: every control call and swap answered."""
    cfg = load_test.LoadConfig(
        replicas=1, transition="async", streams=2, num_deltas=2, max_tokens=6,
        soak_streams=24, soak_max_tokens=64, before_s=1.0, gap_s=0.5, after_s=1.0,
        max_duration_s=180,
    )  # fmt: skip
    report = load_test.run_load_test(cfg, tmp_path)
    print(load_test.format_report(report))
    assert report["control_errors"] == []
    assert report["soak"]["failed"] == 0, report["soak"]["failures"]
    assert report["soak"]["completions"] > 0
    assert report["control"]["health"]["count"] > 0 and report["control"]["status"]["count"] > 0
    assert [s["kind"] for s in report["swaps"]] == ["base", "delta", "delta"]
    assert report["failed"] == 0 and report["corrupted"] == 0, report["failures"]
    for check in report["served_checks"]:
        assert check["replicas_matching"] == check["replicas"] == 1, check

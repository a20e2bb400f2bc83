"""The tracing benchmark's arithmetic: ratios pair batches of the same repetition."""

from __future__ import annotations

import pytest

from tests.bench.bench_tracing import (
    RATIOS,
    VARIANTS,
    markdown_lines,
    median_interval,
    summarise,
)


def _runs(cpu: dict[str, list[float]]) -> dict[str, dict[str, list[dict[str, float]]]]:
    return {"auth": {v: [{"cpu_us": c, "rps": 1000.0} for c in cpu[v]] for v in cpu}}


def test_a_drift_that_hits_every_variant_alike_cancels_out() -> None:
    # the machine got slower and faster between repetitions; within one, off costs 10 % more
    before = [100.0, 300.0, 200.0, 150.0]
    runs = _runs(
        {
            "before": before,
            "before_again": before,
            "landed_off": [c * 1.1 for c in before],
            "off": before,
            "on": [c * 1.5 for c in before],
        }
    )
    figures = summarise(runs)["auth"]
    assert figures["noise"]["median"] == pytest.approx(1.0)
    assert figures["off_cost"]["median"] == pytest.approx(1.1)
    assert figures["off_cost"]["q1"] == pytest.approx(1.1)
    assert figures["off_cost"]["q3"] == pytest.approx(1.1)
    assert figures["on_vs_off"]["median"] == pytest.approx(1.5)
    assert figures["off_cost"]["n"] == 4


def test_the_report_names_each_ratio_per_service() -> None:
    runs = _runs({v: [100.0, 110.0] for v in VARIANTS})
    result = {
        "method": {
            "batch": 200, "reps": 2, "concurrency": 16, "before_ref": "b", "landed_ref": "l",
            "spans_received_while_on": 0,
        },
        "summary": summarise(runs),
    }  # fmt: skip
    text = "\n".join(markdown_lines(result))
    assert "| auth | 1.000 (95 % CI 1.000-1.000; quartiles 1.000-1.000) |" in text
    assert set(RATIOS) == {"noise", "off_cost", "on_vs_off"}
    assert markdown_lines(None) == []


def test_the_median_interval_is_two_order_statistics() -> None:
    values = [float(v) for v in range(1, 31)]  # n = 30: the 10th and the 21st
    assert median_interval(values) == (10.0, 21.0)
    assert median_interval([5.0, 1.0, 3.0]) == (1.0, 5.0)  # too few for 95 %: the range

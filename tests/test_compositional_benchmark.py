"""The compositional benchmark: its statistics against hand-computed cases, and a two-pair smoke run."""

import json
import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import compositional as bench  # noqa: E402


def test_confidence_intervals_by_hand():
    # mean 0.75, sample sd 0.5, half-width 1.96 * 0.5 / 2 = 0.49; clipped at 1
    assert bench.mean_ci([1, 0, 1, 1]) == {"mean": 0.75, "low": 0.26, "high": 1.0, "n": 4}
    # differences (1, 0, 0, 1) - (0, 0, 0, 1) = (1, 0, 0, 0): mean 0.25, sd 0.5, half-width 0.49
    assert bench.paired_difference([1, 0, 0, 1], [0, 0, 0, 1]) == {"mean": 0.25, "low": -0.24, "high": 0.74, "n": 4}


def test_held_out_pairs_are_multi_object_and_outside_the_training_stream():
    pairs = bench.held_out_pairs(30)
    assert [seed for seed, _ in pairs] == list(range(30))
    assert all(len(scene.objects) >= 2 for _, scene in pairs)
    assert all(scene.seed >= bench.HELD_OUT_FIRST_SEED for _, scene in pairs)
    assert any(scene.relation is not None for _, scene in pairs)
    assert bench.held_out_pairs(30)[7][1].caption == pairs[7][1].caption  # fixed set


def test_smoke_run_writes_every_metric(tmp_path):
    out = tmp_path / "compositional.json"
    args = [
        "--pairs",
        "2",
        "--steps",
        "2",
        "--methods",
        "plain",
        "structured",
        "--single-seeds",
        "1",
        "--workers",
        "1",
        "--out",
        str(out),
    ]
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    assert report["single_object"]["right_colour_and_shape"]["n"] == 24  # 6 colours x 4 shapes, one seed
    assert report["pairs"] == 2 and set(report["results"]) == {"plain", "structured"}
    for method, row in report["results"].items():
        assert row["seconds_per_image"] > 0
        for metric in ("object_recall", "attribute_binding", "count_accuracy"):
            assert 0 <= row[metric]["mean"] <= 1 and row[metric]["n"] == 2
        if method == "structured":
            assert "attribute_binding_vs_plain" in row
    with pytest.raises(SystemExit):
        bench.main(["--pairs", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--workers", "0"])


def test_worker_processes_give_the_in_process_results(tmp_path):
    """Two spawned one-thread workers score the same images as the run in this process (same seeds, same model)."""
    reports = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}.json"
        args = ["--pairs", "2", "--steps", "2", "--methods", "plain", "--single-seeds", "0", "--workers", workers]
        assert bench.main([*args, "--out", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    metrics = ("object_recall", "attribute_binding", "count_accuracy")
    assert [reports[0]["results"]["plain"][m] for m in metrics] == [reports[1]["results"]["plain"][m] for m in metrics]
    assert reports[1]["workers"] == 2 and reports[1]["threads_per_worker"] == 1

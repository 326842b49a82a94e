"""benchmarks/editing.py end to end on tiny-sd (quick): every variant asked for is timed, and the step comparison
really runs structured guidance (its result differs from the plain pipeline's)."""

import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))


def test_editing_benchmark_quick_run(tmp_path):
    import editing

    out = tmp_path / "editing.json"
    assert editing.main(["--quick", "--device", "cpu", "--variants", "plain", "structured", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"plain", "structured"}
    for row in rows.values():
        assert row["model"] == "tiny-sd" and row["seconds_per_image"] > 0 and row["peak_memory_mb"] > 0
    (step,) = report["structured_step"]
    assert step["model"] == "tiny-sd" and step["step_plain_ms"] > 0 and step["step_structured_ms"] > 0
    assert step["structured_changes_output"] is True

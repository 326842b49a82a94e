"""The scaling model of benchmarks/radial_parallel.py: calibrated to the measured single-GPU run, with the
all-to-all cost its formula gives."""

import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import radial_parallel  # noqa: E402


def test_model_reproduces_the_measured_gpu_and_scales_as_stated():
    reference = json.loads((radial_parallel.RESULTS / "radial_e2e-nvidia-h100-80gb-hbm3.json").read_text())
    rows = {(r["geometry"], r["gpus"]): r for r in radial_parallel.model(reference)}
    measured = next(r for r in reference["results"] if r["geometry"] == "720p-81f")
    one = rows[("720p-81f", 1)]
    assert one["dense_ms"] == round(measured["dense_ms"], 1) and one["radial_ms"] == round(measured["radial_ms"], 1)
    assert one["all_to_all_ms"] == 0 and one["density"] == round(measured["density"], 4)
    two = rows[("720p-81f", 2)]
    # 4 all-to-alls a layer, 30 layers, each GPU sending half of its 37,800 x 1536 bf16 values
    volume = 37800 * 1536 * 2 / 2
    expected = 30 * 4 * (volume / 350e9 * 1e3 + 0.025)
    assert abs(two["all_to_all_ms"] - expected) < 0.1
    assert abs(two["radial_ms"] - (one["radial_ms"] / 2 + expected)) < 0.2
    long = rows[("720p-321f (4x)", 8)]
    assert long["density"] < one["density"] and long["radial_speedup"] > one["radial_speedup"]

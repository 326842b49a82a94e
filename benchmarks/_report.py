"""What every benchmark shares: the device's name and writing its JSON report under benchmarks/results/."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch


RESULTS = Path(__file__).parent / "results"


def device_name(device: str) -> str:
    """The GPU's name, or the CPU with its thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_report(benchmark: str, device: str, fields: dict, *, quick: bool = False, out: Path | None = None) -> Path:
    """Write {benchmark, device, versions, date, **fields} to `out` or benchmarks/results/<benchmark>-<device>.json."""
    name = device_name(device)
    report = {
        "benchmark": benchmark,
        "device": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        **fields,
    }
    slug = "-".join(filter(None, "".join(c if c.isalnum() else "-" for c in name.lower()).split("-")))[:60]
    path = out or RESULTS / f"{benchmark}-{'quick-' if quick else ''}{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def median_ms(fn, device: str, warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` in ms over `repeats` calls after `warmup` calls (synchronising on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)

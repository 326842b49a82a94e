"""Training curves of shapes-sd and shapes-wan: mean loss per window of steps from `train-shapes` /
`train-shapes-video` logs, one leg per run folder.

    python benchmarks/shapes_training_curve.py --leg "H100, batch 128" runs/shapes-gpu \
        --leg "2 CPU cores, batch 32" runs/shapes-cpu --out benchmarks/results/shapes_training_curve.json

Each run folder holds the `train_log.jsonl` that the trainer appends to (one line per step: phase, step, loss, and
the seconds since the run started when the line was written).
Writes the windows as JSON beside the benchmark results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def windows(log: Path, every: int) -> list[dict]:
    """Mean loss per `every` steps of each phase: [{phase, first_step, last_step, mean_loss}]."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    # A resumed run repeats the steps since its last checkpoint (the same data, seeded per step): keep the last.
    latest = {(line["phase"], line["step"]): line for line in lines}
    out = []
    for phase in dict.fromkeys(line["phase"] for line in lines):  # vae, then unet or denoiser
        steps = sorted((line for (p, _), line in latest.items() if p == phase), key=lambda line: line["step"])
        for i in range(0, len(steps), every):
            chunk = steps[i : i + every]
            out.append({"phase": phase, "first_step": chunk[0]["step"], "last_step": chunk[-1]["step"],
                        "mean_loss": round(statistics.fmean(c["loss"] for c in chunk), 5)})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leg", nargs=2, action="append", metavar=("LABEL", "RUN_FOLDER"), required=True)
    parser.add_argument("--every", type=int, default=100, help="steps per window (default 100)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    legs = []
    for label, folder in args.leg:
        folder = Path(folder)
        state = folder / "pipeline" / "training_state.json"
        legs.append({
            "label": label,
            "training_state": json.loads(state.read_text()) if state.is_file() else None,
            "windows": windows(folder / "train_log.jsonl", args.every),
        })  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "shapes_training_curve", "legs": legs}, indent=1) + "\n")
    for leg in legs:
        last = [w for w in leg["windows"] if w["phase"] != "vae"][-1:]
        print(leg["label"], f"{len(leg['windows'])} windows", last)
    return 0


if __name__ == "__main__":
    sys.exit(main())

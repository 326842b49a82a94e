"""What a kept share is made of: kept and presence per captioned shape, from noise-levels JSONs already written.

    python benchmarks/shapes_wan_by_shape.py A.json:shapes-wan B.json:runs/b/pipeline --out by_shape.json

Each argument is a `shapes_wan_noise_levels.py` JSON and a model key of it; its start-step-0 videos (what the preset
samples from noise) are grouped by the shape their caption asks for (`shapes_wan_layout.by_shape`), so JSONs written
before that benchmark reported the groups itself give them too. Prints a markdown table, one row per model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from _report import write_report  # noqa: E402
from shapes_wan_layout import by_shape  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", metavar="JSON:MODEL", help="a noise-levels JSON and its model key")
    parser.add_argument("--out", type=Path, required=True, help="JSON path")
    args = parser.parse_args(argv)
    results = {}
    for source in args.sources:
        path, _, model = source.partition(":")
        report = json.loads(Path(path).read_text())
        if model not in report["models"] or "0" not in report["models"][model]:
            parser.error(f"{source} is not allowed: {path} holds no start-step-0 videos of {model!r} "
                         f"(models: {', '.join(report['models'])})")  # fmt: skip
        captions = [p["caption"] for p in report["prompts"]]
        results[source] = by_shape(report["models"][model]["0"]["videos"], captions, ("kept", "presence"))
    shapes = sorted({shape for groups in results.values() for shape in groups})
    print("| model | " + " | ".join(f"{s}: kept / presence" for s in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for source, groups in results.items():
        cells = [f"{round(g['kept']['mean'] * g['videos'])} of {g['videos']} / {g['presence']['mean']:.0%}"
                 for g in (groups[s] for s in shapes)]  # fmt: skip
        print(f"| {source} | " + " | ".join(cells) + " |")
    write_report("shapes_wan_by_shape", "cpu", {"sources": args.sources, "by_shape": results}, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The README's tables of `radial_quality.py`, written from its JSON, so that the tables say exactly what was measured.

    python benchmarks/radial_quality_tables.py [benchmarks/results/radial_quality-cpu-x86-64-2-threads.json]

Prints the fidelity table (every variant against dense, with the judge's figures), its paired differences, the
length-extension table and the LoRA-time table, as Markdown rows, and the weights each part measured (a phrase the
README's text around the table holds); given `radial_fidelity_sweep.py`'s JSON, its
table. `tests/test_radial_quality.py` checks that every row printed for the committed JSONs stands in the README
word for word.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from _report import RESULTS  # noqa: E402


DEFAULT_JSON = RESULTS / "radial_quality-cpu-x86-64-2-threads.json"
SWEEP_JSON = RESULTS / "radial_fidelity_sweep-cpu.json"  # radial_fidelity_sweep.py's
MINUS = "\u2212"
FIDELITY_LABELS = {
    "radial-0.25": "radial, decay 0.25 (the preset's)",
    "radial-1": "radial, decay 1.0",
    "random": "random blocks (diagonal and sink kept)",
    "local": "local window, no decay",
    "temporal": "temporal band only",
}
PAIRED_LABELS = {
    "radial-0.25 - radial-1": "radial 0.25 − radial 1.0",
    "radial-0.25 - random": "radial 0.25 − random",
    "radial-0.25 - local": "radial 0.25 − local window",
    "radial-0.25 - temporal": "radial 0.25 − temporal band",
}
EXTENSION_LABELS = {
    "dense": "dense, as trained",
    "radial": "radial, as trained",
    "dense+lora": "dense + LoRA",
    "radial+lora": "radial + LoRA",
}


def signed(value: float, digits: int) -> str:
    """+1.23 / −1.23 with a typographic minus, as the README writes differences."""
    text = f"{value:+.{digits}f}"
    return text.replace("-", MINUS)


def percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def with_interval(stat: dict, digits: int, *, sign: bool = False) -> str:
    """`mean [low, high]` of an `interval` record."""
    fmt = (lambda v: signed(v, digits)) if sign else (lambda v: f"{v:.{digits}f}")
    return f"{fmt(stat['mean'])} [{fmt(stat['low'])}, {fmt(stat['high'])}]"


def fidelity_rows(fidelity: dict) -> list[str]:
    """One row per variant: block density, PSNR and SSIM against dense, the judge on single-object videos."""
    judge = fidelity["dense"]["judge"]
    rows = [
        f"| dense (the reference) | 100% | – | – | {percent(judge['single_kept'])} / "
        f"{percent(judge['single_direction'])} | {percent(judge['mean_presence'])} |"
    ]
    for name, label in FIDELITY_LABELS.items():
        variant = fidelity["variants"][name]
        judge = variant["judge"]
        rows.append(
            f"| {label} | {100 * variant['density']:.1f}% | {with_interval(variant['psnr'], 1)} | "
            f"{with_interval(variant['ssim'], 3)} | {percent(judge['single_kept'])} / "
            f"{percent(judge['single_direction'])} | {percent(judge['mean_presence'])} |"
        )
    return rows


def paired_rows(fidelity: dict) -> list[str]:
    """Paired PSNR and SSIM differences of radial 0.25 against each other variant (same noise)."""
    return [
        f"| {label} | {with_interval(fidelity['paired_psnr_difference'][key], 2, sign=True)} | "
        f"{with_interval(fidelity['paired_ssim_difference'][key], 3, sign=True)} |"
        for key, label in PAIRED_LABELS.items()
    ]


def extension_rows(extension: dict) -> list[str]:
    """Per variant at 4x length: videos kept and moving the right way, the same on single-object videos, presence."""
    rows = []
    for name, label in EXTENSION_LABELS.items():
        variant = extension["variants"][name]
        judge, presence, n = variant["judge"], variant["presence"], variant["presence"]["n"]
        singles = judge["single_object_videos"]
        rows.append(
            f"| {label} | {round(judge['kept'] * n)} of {n} | {round(judge['direction'] * n)} of {n} | "
            f"{round(judge['single_kept'] * singles)} / {round(judge['single_direction'] * singles)} of {singles} | "
            f"{percent(presence['mean'])} [{percent(presence['low'])}, {percent(presence['high'])}] |"
        )
    return rows


def lora_time_row(extension: dict) -> str:
    """The two LoRAs' training time, median step and final loss, and radial's time over dense's."""
    lora, settings = extension["lora"], extension["lora_settings"]
    frames, tokens = extension["latent_geometry"]
    dense, radial = lora["dense"], lora["radial"]
    step_ratio = lora.get("radial_over_dense_median_step")
    step_text = f" (median step {step_ratio:.2f}×)" if step_ratio is not None else ""
    return (
        f"| LoRA training, {settings['steps']} steps at {frames * tokens:,} tokens (CPU) | {dense['seconds']:.0f} s "
        f"(median step {dense['median_step_seconds']:.2f} s; final loss {dense['final_loss']:.3f}) | "
        f"{radial['seconds']:.0f} s ({radial['median_step_seconds']:.2f} s; {radial['final_loss']:.3f}) | "
        f"**{lora['radial_over_dense_time']:.2f}×**{step_text} |"
    )


def sweep_label(name: str, variant: dict, report: dict) -> str:
    """A fidelity-sweep variant as the README names it, from the settings it ran."""
    radial, steps = report["radial"], report["steps"]
    if name == "every block":
        return "a mask of every block (dense attention through the same processors and kernel)"
    if not variant["changed"]:
        return (f"the preset's: decay {radial['decay_factor']:g}, "
                f"first {radial['dense_timesteps']} of {steps} steps dense")  # fmt: skip
    if "decay_factor" in variant["changed"]:
        return f"decay {variant['decay_factor']:.1f}"
    return f"decay {variant['decay_factor']:g}, first {variant['dense_timesteps']} steps dense"


def sweep_rows(report: dict) -> list[str]:
    """radial_fidelity_sweep.py's variants: block density, PSNR and SSIM against dense, paired PSNR against the
    preset's settings; the preset's row first."""
    variants = report["variants"]
    order = sorted(variants, key=lambda name: ("paired_psnr_vs_preset" in variants[name], name == "every block"))
    rows = []
    for name in order:
        variant = variants[name]
        psnr = variant["psnr"]
        psnr_text = "100 (the cap: the same pixels)" if psnr["low"] >= 100 else with_interval(psnr, 1)
        paired = variant.get("paired_psnr_vs_preset")
        paired_text = "–" if paired is None or name == "every block" else with_interval(paired, 2, sign=True)
        rows.append(f"| {sweep_label(name, variant, report)} | {100 * variant['density']:.1f}% | {psnr_text} | "
                    f"{variant['ssim']['mean']:.3f} | {paired_text} |")  # fmt: skip
    return rows


def weights_text(part: dict) -> str:
    """Which weights a part measured, from the training counters it recorded: parts are measured apart, and a
    table may outlive the weights it was measured on."""
    counters = part["weights"]
    return (f"measured on the weights at transformer step {counters['denoiser_step']:,} (autoencoder "
            f"{counters['vae_step']:,} steps, its decoder {counters['decoder_step']:,} more)")  # fmt: skip


def tables(report: dict) -> dict[str, list[str]]:
    """Every table the JSON holds the parts of, by name; `<part>_weights` names the weights each part measured."""
    out = {}
    if "fidelity" in report:
        out["fidelity"] = fidelity_rows(report["fidelity"])
        out["paired"] = paired_rows(report["fidelity"])
        out["fidelity_weights"] = [weights_text(report["fidelity"])]
    if "extension" in report:
        out["extension"] = extension_rows(report["extension"])
        out["lora_time"] = [lora_time_row(report["extension"])]
        out["extension_weights"] = [weights_text(report["extension"])]
    if report.get("benchmark") == "radial_fidelity_sweep":
        out["sweep"] = sweep_rows(report)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="?", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    for name, rows in tables(json.loads(args.json.read_text())).items():
        print(f"<!-- {name} -->")
        print("\n".join(rows))
        print()


if __name__ == "__main__":
    main()

"""End-to-end radial attention: one Wan 2.1 transformer forward, dense vs radial, against the Amdahl bound.

    python benchmarks/radial_e2e.py              # GPU: Wan2.1-1.3B config (random weights), bf16, 480p and 720p at 81f
    python benchmarks/radial_e2e.py --quick      # a small smoke run

In the same run it measures the share of forward time spent in video self-attention, f = (t_dense - t_without) /
t_dense, where t_without is the same forward with self-attention skipped, and reports the measured speedup next to
the bound 1 / ((1 - f) + f * density) for the radial mask's density. CPU: the 1.3B layer width with fewer layers
and a reduced geometry (float32), since a full forward does not fit a CPU budget. Writes JSON to
benchmarks/results/ naming the device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import diffattn
from diffattn.adapters import WanSelfAttnProcessor, attention_processors


sys.path.insert(0, str(Path(__file__).parent))
from _report import median_ms, write_report  # noqa: E402


WAN_1_3B = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer config
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
}
# name -> (latent frames, latent height, latent width): 81 frames at 480x832 and 720x1280
GPU_GEOMETRIES = {"480p-81f": (21, 60, 104), "720p-81f": (21, 90, 160)}
CPU_GEOMETRIES = {"cpu-81f-192x320": (21, 24, 40)}  # 21 latent frames like 81f, 240 tokens each
QUICK_GEOMETRIES = {"quick": (5, 16, 16)}


class _SkipAttention(WanSelfAttnProcessor):
    """Wan self-attention with the attention op itself skipped (returns v): the forward's non-attention cost."""

    def attend(self, attn, query, key, value):
        return value


def _timer(device: str, repeats: int):
    return lambda fn: median_ms(fn, device, 1, repeats)


def run(geometries: dict, config: dict, device: str, dtype: torch.dtype, decay: float, block: int, repeats: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs: a CPU init of 1.3B parameters takes longer than the run
        model = WanTransformer3DModel(**config)
    model = model.to(dtype).eval()
    measure = _timer(device, repeats)
    rows = []
    for name, (frames, height, width) in geometries.items():
        latents = torch.randn(1, 16, frames, height, width, device=device, dtype=dtype)
        text = torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype)
        timestep = torch.tensor([500.0], device=device)

        def forward():
            with torch.no_grad():
                return model(latents, timestep, text, return_dict=False)[0]

        t_dense = measure(forward)
        originals = dict(attention_processors(model))
        skip = {k: _SkipAttention() for k in originals if k.endswith("attn1.processor")}
        model.set_attn_processor({**originals, **skip})
        t_without = measure(forward)
        model.set_attn_processor(originals)
        radial = diffattn.RadialAttentionConfig(
            dense_layers=0, dense_timesteps=0, decay_factor=decay, block_size=block
        )
        handle = diffattn.apply(model, radial)
        t_radial = measure(forward)
        layout = next(iter(handle.methods[0].cache.layouts.values()))
        handle.remove()
        f = max(0.0, (t_dense - t_without) / t_dense)
        bound = 1.0 / ((1.0 - f) + f * layout.density)
        speedup = t_dense / t_radial
        tokens = frames * (height // 2) * (width // 2)
        rows.append(
            {
                "geometry": name,
                "latent_frames": frames,
                "tokens": tokens,
                "layers": config["num_layers"],
                "decay_factor": decay,
                "block_size": block,
                "density": round(layout.density, 4),
                "dense_ms": round(t_dense, 2),
                "without_self_attention_ms": round(t_without, 2),
                "radial_ms": round(t_radial, 2),
                "attention_share_f": round(f, 4),
                "speedup": round(speedup, 3),
                "bound": round(bound, 3),
                "speedup_over_bound": round(speedup / bound, 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run")
    parser.add_argument("--decay-factor", type=float, default=0.2, help="lambda (Wan upstream: 0.2)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    config = dict(WAN_1_3B)
    if args.device == "cuda":
        geometries, dtype, repeats, block = GPU_GEOMETRIES, torch.bfloat16, 3, 128
    else:
        geometries, dtype, repeats, block = CPU_GEOMETRIES, torch.float32, 2, 64
        config["num_layers"] = 2
    if args.quick:
        geometries, repeats = QUICK_GEOMETRIES, 1
        config.update(num_layers=1, num_attention_heads=2, ffn_dim=256, text_dim=64)
    rows = run(geometries, config, args.device, dtype, args.decay_factor, block, repeats)
    fields = {
        "dtype": str(dtype).replace("torch.", ""),
        "model": "WanTransformer3DModel, Wan2.1-T2V-1.3B config, random weights"
        + ("" if args.device == "cuda" else f", {config['num_layers']} layers"),
        "results": rows,
    }
    write_report("radial_e2e", args.device, fields, quick=args.quick, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

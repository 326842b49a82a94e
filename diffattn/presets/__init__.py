"""Tiny offline presets: real diffusers pipelines built from configs with seeded random weights.

Nothing can be downloaded in tests, CI or `make demo`, so each preset is built once from its config, saved with
`save_pretrained` (safetensors) under `$DIFFATTN_CACHE/presets/` (default `~/.cache/diffattn`), and from then on
always loaded with `from_pretrained` from there: the same loading code a real model id goes through.
The weights are random, so outputs are noise-like; the structure (attention layers, patching, rotary embeddings,
text layout) is what the methods need and what the presets keep.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .image import build_tiny_sd, build_tiny_sdxl
from .video import (
    build_tiny_cogvideox,
    build_tiny_hunyuan_video,
    build_tiny_ltx_video,
    build_tiny_mochi,
    build_tiny_wan,
)


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A tiny pipeline and the call arguments it is meant to run with.

    `version` is part of the cache folder's name: bump it when the builder changes so stale caches are not used.
    """

    name: str
    kind: str  # "image" or "video"
    family: str
    description: str
    build: Callable[[], Any]
    call_defaults: dict[str, Any] = field(default_factory=dict)
    version: int = 1


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny-sd",
            "image",
            "stable-diffusion-unet",
            "SD 1.x-shaped UNet, 128x128 px, attention at 16x16/8x8/4x4",
            build_tiny_sd,
            {"height": 128, "width": 128, "guidance_scale": 7.5},
        ),
        Preset(
            "tiny-sdxl",
            "image",
            "stable-diffusion-unet",
            "SDXL-shaped UNet with two text encoders, 256x256 px",
            build_tiny_sdxl,
            {"height": 256, "width": 256, "guidance_scale": 5.0},
        ),
        Preset(
            "tiny-wan",
            "video",
            "wan",
            "Wan 2.1 T2V-shaped transformer, 9 frames of 128x128 px (3x8x8 tokens)",
            build_tiny_wan,
            {"height": 128, "width": 128, "num_frames": 9, "guidance_scale": 5.0, "max_sequence_length": 64},
        ),
        Preset(
            "tiny-hunyuan-video",
            "video",
            "hunyuan-video",
            "HunyuanVideo-shaped joint-attention transformer, 9 frames of 128x128 px",
            build_tiny_hunyuan_video,
            {"height": 128, "width": 128, "num_frames": 9, "guidance_scale": 6.0, "max_sequence_length": 64},
        ),
        Preset(
            "tiny-cogvideox",
            "video",
            "cogvideox",
            "CogVideoX-shaped joint-attention transformer (text then video), 9 frames of 128x128 px",
            build_tiny_cogvideox,
            {"height": 128, "width": 128, "num_frames": 9, "guidance_scale": 6.0, "max_sequence_length": 32},
        ),
        Preset(
            "tiny-ltx-video",
            "video",
            "ltx-video",
            "LTX-Video-shaped transformer on packed tokens, 9 frames of 128x128 px",
            build_tiny_ltx_video,
            {"height": 128, "width": 128, "num_frames": 9, "guidance_scale": 3.0, "max_sequence_length": 32},
        ),
        Preset(
            "tiny-mochi",
            "video",
            "mochi",
            "Mochi-shaped asymmetric joint-attention transformer, 7 frames of 128x128 px",
            build_tiny_mochi,
            {"height": 128, "width": 128, "num_frames": 7, "guidance_scale": 4.5, "max_sequence_length": 32},
        ),
    )
}

DEFAULT_PRESET = "tiny-sd"


def cache_dir() -> Path:
    """`$DIFFATTN_CACHE` or `~/.cache/diffattn`."""
    return Path(os.environ.get("DIFFATTN_CACHE") or Path.home() / ".cache" / "diffattn")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _save_quietly(pipe: Any, folder: Path) -> None:
    """save_pretrained without the per-shard progress bars of transformers and the hub client (a one-off build)."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # also the hub client's
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def preset_path(name: str, root: Path | None = None) -> Path:
    """The folder holding preset `name` in diffusers format, built and saved there on first use.

    The folder is written under a temporary name and renamed into place, so a crash or a concurrent build never
    leaves a half-written preset behind.
    """
    preset = get_preset(name)
    root = Path(root) if root is not None else cache_dir()
    target = root / "presets" / f"{preset.name}-v{preset.version}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building preset %s into %s", name, target)
    pipe = preset.build()
    tmp = Path(tempfile.mkdtemp(prefix=f".{preset.name}-", dir=target.parent))
    try:
        _save_quietly(pipe, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

"""Offline presets: `shapes-sd` and `shapes-wan`, small models diffattn trains itself (shipped in the package), and
tiny pipelines built from configs with seeded random weights.

Nothing can be downloaded in tests, CI or `make demo`, so each preset is built once from its config, saved with
`save_pretrained` (safetensors) under `$DIFFATTN_CACHE/presets/` (default `~/.cache/diffattn`), and from then on
always loaded with `from_pretrained` from there: the same loading code a real model id goes through.
The tiny presets' weights are random, so their outputs are noise-like; the structure (attention layers, patching,
rotary embeddings, text layout) is what the methods need and what they keep. `shapes-sd` (`diffattn train-shapes`,
see `diffattn.shapes_training`) draws real pictures of coloured shapes, so the editing methods show real effects;
`shapes-wan` (`diffattn train-shapes-video`) draws moving shapes, so radial attention's cost in quality is visible.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..judge import describe, subject_mask
from ..methods.radial_attention import RadialAttentionConfig
from .image import build_tiny_sd, build_tiny_sdxl
from .shapes_video import MAX_SEQUENCE_LENGTH, NUM_FRAMES, SIZE
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
    build: Callable[[], Any] | None
    call_defaults: dict[str, Any] = field(default_factory=dict)
    version: int = 1
    steps: int = 4  # denoising steps a call takes when it names none
    shipped: str | None = None  # a trained pipeline shipped inside this package (folder name), instead of `build`
    demo_prompt: str | None = None  # a prompt in the preset's vocabulary (None: the demo's general prompt)
    # segmenter(image, subject) -> mask for pictures one can read (IR-Diffusion's subject masks); None: from attention
    segmenter: Callable[[Any, str], Any] | None = None
    # describe(image) -> what a judge sees in it, in words (None: no judge for this model's pictures)
    describe: Callable[[Any], str] | None = None
    radial: RadialAttentionConfig | None = None  # the radial settings this model runs with (None: the library's)
    # frames of the dense-vs-radial comparisons (demo, the UI's Compare tab): enough latent frames that the mask is
    # sparse, and a count the model's autoencoder keeps (1 + a multiple of its time compression)
    compare_frames: int | None = None

    @property
    def prompt(self) -> str:
        """The prompt the demo and the UI start this model with: its own, else the general one."""
        return self.demo_prompt or GENERAL_PROMPT


GENERAL_PROMPT = "a photo of a red cat sitting on a blue chair"  # presets without a vocabulary of their own

SHIPPED = Path(__file__).parent

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "shapes-sd",
            "image",
            "stable-diffusion-unet",
            "a real text-to-image model trained by diffattn on coloured-shape scenes (64x64 px, 5.7 MB fp16)",
            None,
            {"height": 64, "width": 64, "guidance_scale": 5.0},
            steps=20,
            shipped="shapes_sd",
            demo_prompt="a red circle and a blue square",
            segmenter=subject_mask,
            describe=describe,
        ),
        Preset(
            "shapes-wan",
            "video",
            "wan",
            "a real Wan-architecture text-to-video model trained by diffattn on moving coloured shapes "
            "(33 frames of 64x64 px, 9x16x16 latent tokens)",
            None,
            {
                "height": SIZE,
                "width": SIZE,
                "num_frames": NUM_FRAMES,
                "guidance_scale": 5.0,
                "max_sequence_length": MAX_SEQUENCE_LENGTH,
            },
            steps=20,
            shipped="shapes_wan",
            demo_prompt="a red circle moving right",
            # 16-token blocks: a frame is 16 blocks, so the band is resolved; a quarter of the steps dense, as upstream
            radial=RadialAttentionConfig(block_size=16, decay_factor=0.25, dense_timesteps=5, dense_layers=0),
            compare_frames=33,
        ),
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
            compare_frames=33,
        ),
        Preset(
            "tiny-hunyuan-video",
            "video",
            "hunyuan-video",
            "HunyuanVideo-shaped joint-attention transformer, 9 frames of 128x128 px",
            build_tiny_hunyuan_video,
            {"height": 128, "width": 128, "num_frames": 9, "guidance_scale": 6.0, "max_sequence_length": 64},
            compare_frames=33,
        ),
        Preset(
            "tiny-cogvideox",
            "video",
            "cogvideox",
            "CogVideoX-shaped joint-attention transformer (text then video), 9 frames of 128x128 px",
            build_tiny_cogvideox,
            {"height": 128, "width": 128, "num_frames": 9, "guidance_scale": 6.0, "max_sequence_length": 32},
            compare_frames=33,
        ),
        Preset(
            "tiny-ltx-video",
            "video",
            "ltx-video",
            "LTX-Video-shaped transformer on packed tokens, 9 frames of 128x128 px",
            build_tiny_ltx_video,
            {"height": 128, "width": 128, "num_frames": 9, "guidance_scale": 3.0, "max_sequence_length": 32},
            compare_frames=65,
        ),
        Preset(
            "tiny-mochi",
            "video",
            "mochi",
            "Mochi-shaped asymmetric joint-attention transformer, 7 frames of 128x128 px",
            build_tiny_mochi,
            {"height": 128, "width": 128, "num_frames": 7, "guidance_scale": 4.5, "max_sequence_length": 32},
            compare_frames=49,
        ),
    )
}

DEFAULT_PRESET = "shapes-sd"  # the default image model: trained, so methods show real effects
DEFAULT_VIDEO_PRESET = "shapes-wan"  # the default video model: trained, so dense and radial videos can be compared


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
        with _every_rank_saves(pipe):
            pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


@contextmanager
def _every_rank_saves(pipe: Any) -> Iterator[None]:
    """While torch.distributed is initialised, transformers writes a model's files on rank 0 only (its
    `should_save_on_this_rank` hook, not a public API): a preset built by another process of a launch would have an
    empty text encoder folder. The hook is overridden on this pipeline's models for the save, nowhere else; if
    transformers renames it, `missing_components` still refuses the incomplete folder."""
    patched = [c for c in pipe.components.values() if callable(getattr(c, "should_save_on_this_rank", None))]
    for component in patched:
        component.should_save_on_this_rank = lambda is_main_process: True
    try:
        yield
    finally:
        for component in patched:
            del component.should_save_on_this_rank


def missing_components(folder: Path) -> list[str]:
    """Components model_index.json names whose subfolder is absent or empty, or holds a model config without
    weights (what an interrupted or rank-skipped save leaves); every one when model_index.json itself is missing."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return ["model_index.json"]
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / name
        files = [f.name for f in sub.iterdir()] if sub.is_dir() else []
        has_weights = any(".safetensors" in f or f.endswith(".bin") for f in files)
        if not files or ("config.json" in files and not has_weights):
            missing.append(name)
    return missing


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An flock held while one process builds a preset: the others wait, then find it built (the kernel releases
    the lock of a killed builder)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def preset_path(name: str, root: Path | None = None) -> Path:
    """The folder holding preset `name` in diffusers format, built and saved there on first use.

    One process builds at a time (an flock beside the folder; the others wait and load its result), writing under a
    temporary name renamed into place, so a crash never leaves a half-written preset behind. A folder missing a
    component (see `missing_components`) is rebuilt, not loaded.
    """
    preset = get_preset(name)
    if preset.shipped is not None:  # trained weights in the package: loaded in place, nothing to build
        folder = SHIPPED / preset.shipped
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"preset {name!r}: its weights are missing from the installation ({folder})")
        return folder
    root = Path(root) if root is not None else cache_dir()
    target = root / "presets" / f"{preset.name}-v{preset.version}"
    if not missing_components(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock"):
        broken = missing_components(target)
        if not broken:  # another process built it while this one waited
            return target
        if target.exists():
            logger.warning("preset %s in %s lacks %s: rebuilding it", name, target, ", ".join(broken))
            trash = Path(tempfile.mkdtemp(prefix=f".{preset.name}-broken-", dir=target.parent))
            os.replace(target, trash / "folder")
            shutil.rmtree(trash, ignore_errors=True)
        logger.info("building preset %s into %s", name, target)
        pipe = preset.build()
        tmp = Path(tempfile.mkdtemp(prefix=f".{preset.name}-", dir=target.parent))
        try:
            _save_quietly(pipe, tmp)
            unsaved = missing_components(tmp)
            if unsaved:
                raise RuntimeError(f"preset {name!r}: saving it wrote no files for {', '.join(unsaved)} ({tmp})")
            try:
                os.replace(tmp, target)
            except OSError:
                if missing_components(target):  # lost a race only if the winner's folder is whole
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target

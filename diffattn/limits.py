"""Size limits of one generation request, checked before a pipeline is loaded or anything large is allocated.

The defaults admit every documented use of the supported real models (SDXL at 1024 x 1024, Wan / HunyuanVideo at
720p, radial attention's 4x-length videos at 720p: 1280 x 720 x 509 frames) and refuse absurd requests (8192 x 8192,
10,001 frames, 4096 x 4096 x 161 frames, a million steps). Raise them explicitly:

    diffattn generate ... --limits max_frames=2048 max_steps=5000
    DIFFATTN_LIMITS="max_pixels=16777216,max_side=8192" diffattn batch job.jsonl --out out/

The UI's limits are set by whoever serves it (`python app.py --limits ...`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from .validation import check_int_range


ENV_VAR = "DIFFATTN_LIMITS"


@dataclass(frozen=True)
class Limits:
    """Largest request a face accepts.

    Args:
        max_side: largest height or width in pixels.
        max_pixels: largest height x width of one image or video frame.
        max_frames: largest frame count of a video.
        max_pixel_frames: largest height x width x frames of one video.
        max_steps: largest number of denoising steps.
        max_batch: largest number of outputs in one pipeline call.
    """

    max_side: int = 4096
    max_pixels: int = 2048 * 2048
    max_frames: int = 1024
    max_pixel_frames: int = 1280 * 720 * 544
    max_steps: int = 1000
    max_batch: int = 64

    def __post_init__(self):
        for f in fields(self):
            check_int_range(f.name, getattr(self, f.name), 1)

    def check(
        self,
        *,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        steps: int | None = None,
        batch: int = 1,
    ) -> None:
        """Raise ValueError naming the field, the value, the limit and how to raise it, for the first one exceeded."""
        hint = f"; raise it with --limits or {ENV_VAR} (see diffattn.Limits)"
        for name, value in (("height", height), ("width", width)):
            if value is not None and value > self.max_side:
                raise ValueError(f"{name}={value} is not allowed: the limit is max_side={self.max_side}{hint}")
        if height is not None and width is not None and height * width > self.max_pixels:
            raise ValueError(
                f"height x width={height}x{width} ({height * width:,} pixels) is not allowed: the limit is "
                f"max_pixels={self.max_pixels:,}{hint}"
            )
        if num_frames is not None:
            if num_frames > self.max_frames:
                raise ValueError(
                    f"num_frames={num_frames} is not allowed: the limit is max_frames={self.max_frames}{hint}"
                )
            if height is not None and width is not None and height * width * num_frames > self.max_pixel_frames:
                raise ValueError(
                    f"height x width x num_frames={height}x{width}x{num_frames} is not allowed: the limit is "
                    f"max_pixel_frames={self.max_pixel_frames:,}{hint}"
                )
        if steps is not None and steps > self.max_steps:
            raise ValueError(f"steps={steps} is not allowed: the limit is max_steps={self.max_steps}{hint}")
        if batch > self.max_batch:
            raise ValueError(f"batch={batch} is not allowed: the limit is max_batch={self.max_batch}{hint}")

    @classmethod
    def parse(cls, items: list[str] | str, base: Limits | None = None) -> Limits:
        """Limits from `name=value` items (a list, or one string separated by commas or spaces) over `base`."""
        base = base or cls()
        if isinstance(items, str):
            items = items.replace(",", " ").split()
        names = [f.name for f in fields(cls)]
        changes: dict[str, int] = {}
        for item in items:
            name, sep, text = item.partition("=")
            name = name.strip()
            if not sep or name not in names:
                raise ValueError(
                    f"limits: {item!r} is not allowed: expected NAME=INT with NAME one of {', '.join(names)}"
                )
            try:
                changes[name] = int(text.strip())
            except ValueError:
                raise ValueError(f"limits: {name}={text.strip()!r} is not allowed: expected an int >= 1") from None
        return replace(base, **changes)

    @classmethod
    def from_env(cls) -> Limits:
        """The defaults, raised or lowered by the DIFFATTN_LIMITS environment variable when it is set."""
        text = os.environ.get(ENV_VAR, "").strip()
        return cls.parse(text) if text else cls()

"""Fidelity of one video to another: PSNR and SSIM (Wang et al. 2004), frame by frame, averaged over the video.

Frames are uint8 RGB arrays or PIL images of equal size; videos are lists of them. SSIM is the standard form: a
11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, dynamic range 255, computed per channel on the valid
region (no padding) and averaged over channels and positions.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch


PSNR_CAP = 100.0  # identical frames: reported as this many dB instead of infinity (keeps means finite)
_WINDOW, _SIGMA = 11, 1.5


def _frames(video: Sequence[Any]) -> torch.Tensor:
    """A video (frames: PIL images or [H, W, 3] uint8 arrays) -> float64 [F, 3, H, W] in [0, 255]."""
    arrays = [np.asarray(frame, dtype=np.float64) for frame in video]
    if not arrays:
        raise ValueError("a video with no frames is not allowed")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or arrays[0].ndim != 3:
        raise ValueError(f"frames of one video must share one [H, W, C] shape, got {sorted(shapes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _pair(video: Sequence[Any], reference: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _frames(video), _frames(reference)
    if a.shape != b.shape:
        raise ValueError(f"videos of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared")
    return a, b


def psnr(video: Sequence[Any], reference: Sequence[Any]) -> float:
    """Mean over frames of 10 log10(255^2 / MSE), each frame capped at PSNR_CAP dB."""
    a, b = _pair(video, reference)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    values = [PSNR_CAP if m == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / m)) for m in mse.tolist()]
    return float(np.mean(values))


def _gaussian_taps() -> torch.Tensor:
    """The window's 1-D factor (float64, sums to 1): the 11x11 window is its outer product with itself."""
    x = torch.arange(_WINDOW, dtype=torch.float64) - (_WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * _SIGMA**2))
    return g / g.sum()


def _band(size: int) -> torch.Tensor:
    """[size - 10, size]: row i holds the window's 1-D taps at columns i..i+10 (one valid position a row)."""
    taps, rows = _gaussian_taps(), size - _WINDOW + 1
    band = torch.zeros(rows, size, dtype=torch.float64)
    for i in range(rows):
        band[i, i : i + _WINDOW] = taps
    return band


def _blur(x: torch.Tensor) -> torch.Tensor:
    """The 11x11 Gaussian window over the valid region of every [H, W] plane of x [..., H, W]: the window is the
    outer product of its 1-D taps, so it is two banded matrix products (the same sums, at matrix-product speed)."""
    return _band(x.shape[-2]) @ x @ _band(x.shape[-1]).T


def ssim(video: Sequence[Any], reference: Sequence[Any]) -> float:
    """Mean structural similarity over frames (1.0: identical). Frames need sides of at least 11 px."""
    a, b = _pair(video, reference)
    if min(a.shape[-2:]) < _WINDOW:
        raise ValueError(f"SSIM needs frames of at least {_WINDOW}x{_WINDOW} px, got {tuple(a.shape[-2:])}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    # the five local means in one pass: mu_a, mu_b, E[a^2], E[b^2], E[ab]
    mu_a, mu_b, aa, bb, ab = _blur(torch.cat([a, b, a * a, b * b, a * b], dim=1)).chunk(5, dim=1)
    var_a = aa - mu_a**2
    var_b = bb - mu_b**2
    cov = ab - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.flatten(1).mean(1).mean())

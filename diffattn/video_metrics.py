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


def _gaussian_window() -> torch.Tensor:
    x = torch.arange(_WINDOW, dtype=torch.float64) - (_WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * _SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, _WINDOW, _WINDOW)


def ssim(video: Sequence[Any], reference: Sequence[Any]) -> float:
    """Mean structural similarity over frames (1.0: identical). Frames need sides of at least 11 px."""
    a, b = _pair(video, reference)
    if min(a.shape[-2:]) < _WINDOW:
        raise ValueError(f"SSIM needs frames of at least {_WINDOW}x{_WINDOW} px, got {tuple(a.shape[-2:])}")
    window = _gaussian_window()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, window, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.flatten(1).mean(1).mean())

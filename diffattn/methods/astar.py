"""A-STAR (Agarwal et al., ICCV 2023) and Attend-and-Excite (Chefer et al., 2023): losses on cross-attention maps.

The maps are those of the concept tokens at one UNet resolution (16x16 for SD at 512 px), averaged over heads and
layers, x100 and softmaxed over the text positions 1..T-2 (the start token and the last position dropped), then
smoothed with a 3x3 kernel, all exactly as Attend-and-Excite's reference code computes them (diffusers'
`StableDiffusionAttendAndExcitePipeline`). That kernel is exp(-((x - m) / (2 sigma))^2) with sigma = 0.5, normalised:
a Gaussian of standard deviation sigma * sqrt(2) ~ 0.707 (1-D weights 0.212 / 0.576 / 0.212), not the 0.5 its
name says. A-STAR uses the same maps and kernel: its reference setup is built on Attend-and-Excite's code.

- segregation (A-STAR): sum over concept pairs m > n of soft IoU(A^m, A^n) = sum min(A^m, A^n) / sum (A^m + A^n);
  it is low when concepts occupy different pixels;
- retention (A-STAR): sum over concepts of 1 - soft IoU(A^m_t, B^m_{t+1}), with B the previous (noisier) step's
  map binarised at `threshold` x its maximum; it keeps each concept where it already was;
- attend-and-excite: max over concepts of (1 - max_ij A^m_ij), the worst-attended concept's deficit.

Maps: [B, M, h, w] (B images, M concepts); losses are summed over the batch (images are independent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel(size: int = 3, sigma: float = 0.5, device=None, dtype=torch.float32) -> torch.Tensor:
    """Attend-and-Excite's normalised [size, size] smoothing kernel, exp(-((x - m) / (2 sigma))^2) per axis (a
    Gaussian of standard deviation sigma * sqrt(2), as the reference code writes it)."""
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-((coords / (2 * sigma)) ** 2))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def concept_maps(
    maps: torch.Tensor, token_indices: list[int], *, smooth: bool = True, sigma: float = 0.5, kernel: int = 3
) -> torch.Tensor:
    """Per-concept maps from token maps. maps: [B, T, h, w] (T prompt tokens, 0 = start) -> [B, M, h, w].

    x100, softmax over the text positions 1..T-2 (as Attend-and-Excite's reference: the start token and the last
    position are left out), then the chosen tokens (indices counted with the start token, each < T - 1), then
    smoothing with `gaussian_kernel` and reflect padding.
    """
    if any(not 1 <= i < maps.shape[1] - 1 for i in token_indices):
        raise ValueError(
            f"token_indices={token_indices} is not allowed: expected positions in [1, {maps.shape[1] - 2}]"
        )
    scaled = maps[:, 1:-1] * 100.0
    probs = torch.softmax(scaled.flatten(2).transpose(1, 2), dim=-1).transpose(1, 2).view_as(scaled)
    chosen = probs[:, [i - 1 for i in token_indices]]  # indices counted with the start token
    if not smooth:
        return chosen
    b, m, h, w = chosen.shape
    weight = gaussian_kernel(kernel, sigma, chosen.device, chosen.dtype)[None, None]
    padded = F.pad(chosen.reshape(b * m, 1, h, w), (kernel // 2,) * 4, mode="reflect")
    return F.conv2d(padded, weight).view(b, m, h, w)


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum min(a, b) / sum (a + b) over the last two dims."""
    return torch.minimum(a, b).sum((-2, -1)) / (a + b).sum((-2, -1)).clamp_min(1e-12)


def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """A-STAR's segregation loss. maps: [B, M, h, w] -> scalar (sum over pairs and images)."""
    total = maps.new_zeros(())
    for m in range(maps.shape[1]):
        for n in range(m):
            total = total + soft_iou(maps[:, m], maps[:, n]).sum()
    return total


def binarize(maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """1 where a map reaches `threshold` of its own maximum, else 0 (detached: a target, not a path)."""
    peak = maps.detach().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return (maps.detach() >= threshold * peak).to(maps.dtype)


def retention_loss(maps: torch.Tensor, previous_binary: torch.Tensor) -> torch.Tensor:
    """A-STAR's retention loss against the previous step's binarised maps. Both [B, M, h, w] -> scalar."""
    return (1.0 - soft_iou(maps, previous_binary)).sum()


def attend_and_excite_loss(maps: torch.Tensor) -> torch.Tensor:
    """Attend-and-Excite: per image, max over concepts of (1 - max attention); summed over images."""
    deficits = 1.0 - maps.amax(dim=(-2, -1))  # [B, M]
    return deficits.clamp_min(0).amax(dim=1).sum()

"""IR-Diffusion's subject masks: their geometry (Otsu thresholds, resizing to a layer's grid, the relocation of a
reference's subject onto its place in the target, the masks one layer needs) and the picture of them.

Masks: float or bool [subjects, height, width] in [0, 1]; per layer they become bool [subjects, N] on its grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


def otsu_mask(values: torch.Tensor) -> torch.Tensor:
    """values: [..., N] -> bool [..., N], each row split at its Otsu threshold (the cut of the sorted values that
    maximises the between-class variance w0 w1 (mu0 - mu1)^2; exact, no histogram). A constant row is split at 0.5."""
    flat = values.float().reshape(-1, values.shape[-1])
    out = torch.empty(flat.shape, dtype=torch.bool, device=values.device)
    for row, v in enumerate(flat):
        s = v.sort().values
        n = s.numel()
        if n < 2 or s[0] == s[-1]:
            out[row] = v > 0.5
            continue
        k = torch.arange(1, n, device=v.device, dtype=torch.float64)  # k values below the cut
        below = s.double().cumsum(0)[:-1]
        mean0, mean1 = below / k, (s.double().sum() - below) / (n - k)
        variance = (k / n) * (1 - k / n) * (mean0 - mean1) ** 2
        variance[s[1:] <= s[:-1]] = -1.0  # a cut must fall between two different values
        cut = int(variance.argmax()) + 1
        out[row] = v > (s[cut - 1] + s[cut]) / 2
    return out.reshape(values.shape)


def binary_subject_masks(soft: torch.Tensor, exclusive: bool = True) -> torch.Tensor:
    """soft: [n, h, w] in [0, 1] -> bool [n, h, w]: each mask split at its Otsu threshold; with `exclusive`, a pixel
    claimed by several subjects goes to the one with the larger soft value (each pixel has at most one subject)."""
    flat = soft.float().flatten(1)
    binary = otsu_mask(flat)
    if exclusive and soft.shape[0] > 1:
        owner = torch.where(binary, flat, torch.full_like(flat, -1.0)).argmax(dim=0)
        binary &= owner[None] == torch.arange(soft.shape[0], device=soft.device)[:, None]
    return binary.view(soft.shape)


def masks_at(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """masks: [n, H, W] in [0, 1] -> bool [n, height*width]: bilinear resize, then `binary_subject_masks`."""
    resized = F.interpolate(masks[:, None].float(), size=(height, width), mode="bilinear", antialias=True)[:, 0]
    return binary_subject_masks(resized).flatten(1)


def bounding_box(mask: torch.Tensor, height: int, width: int) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), inclusive, of the True tokens of mask: [height*width]; None if there are none."""
    grid = mask.view(height, width)
    rows, cols = grid.any(dim=1).nonzero().flatten(), grid.any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def relocation(
    reference: torch.Tensor, target: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each target token reads the relocated reference from: (source: long [N], valid: bool [N]).

    reference, target: bool [N] masks of one subject on a height x width grid. The reference's bounding box is
    nearest-resized onto the target's (source pixel = box start + floor(offset * in_size / out_size), as
    torch's "nearest" mode); `valid` is the relocated reference mask: inside the target box and inside M^ref at
    the source pixel.
    """
    n = height * width
    source = torch.zeros(n, dtype=torch.long, device=reference.device)
    valid = torch.zeros(n, dtype=torch.bool, device=reference.device)
    ref_box, tgt_box = bounding_box(reference, height, width), bounding_box(target, height, width)
    if ref_box is None or tgt_box is None:
        return source, valid
    ry0, ry1, rx0, rx1 = ref_box
    ty0, ty1, tx0, tx1 = tgt_box
    ys = torch.arange(ty0, ty1 + 1, device=reference.device)
    xs = torch.arange(tx0, tx1 + 1, device=reference.device)
    src_y = ry0 + ((ys - ty0) * (ry1 - ry0 + 1)) // (ty1 - ty0 + 1)
    src_x = rx0 + ((xs - tx0) * (rx1 - rx0 + 1)) // (tx1 - tx0 + 1)
    dst = (ys[:, None] * width + xs[None, :]).flatten()
    src = (src_y[:, None] * width + src_x[None, :]).flatten()
    source[dst] = src
    valid[dst] = reference[src]
    return source, valid


@dataclass
class LevelMasks:
    """The subject masks on one token grid, precomputed once so the attention calls only gather and mask.

    reference, target: bool [n, N]; source: long [n, N] (relocation), valid: bool [n, N] (relocated M^ref);
    isolation: bool [N, N], True where a target query may attend to a target key.
    """

    reference: torch.Tensor
    target: torch.Tensor
    source: torch.Tensor
    valid: torch.Tensor
    isolation: torch.Tensor

    @property
    def num_subjects(self) -> int:
        return self.target.shape[0]


def level_masks(reference: torch.Tensor, target: torch.Tensor, height: int, width: int) -> LevelMasks:
    """LevelMasks for a height x width grid from reference, target: [n, H, W] masks in [0, 1]."""
    ref = masks_at(reference, height, width)
    tgt = masks_at(target, height, width)
    pairs = [relocation(ref[i], tgt[i], height, width) for i in range(ref.shape[0])]
    source = torch.stack([p[0] for p in pairs])
    valid = torch.stack([p[1] for p in pairs])
    t = tgt.float()
    same = t.T @ t  # [N, N]: query and key in the same subject
    both = t.sum(0)[:, None] * t.sum(0)[None, :]  # query and key each in some subject
    isolation = ~((both - same) > 0)
    isolation |= torch.eye(height * width, dtype=torch.bool, device=t.device)
    return LevelMasks(ref, tgt, source, valid, isolation)


# ------------------------------------------------------------------------------------------------------------ picture

_OUTLINE_COLOURS = ((0, 190, 0), (255, 140, 0), (0, 190, 220), (210, 0, 210), (0, 0, 0))


def _outlined(image: Image.Image, masks: torch.Tensor, cell: int, first: int = 0) -> Image.Image:
    """`image` at cell x cell with each mask (float [n, h, w]) outlined in its subject's colour (an outline, not a
    tint, so the subject's own colours stay readable)."""
    base = np.asarray(image.convert("RGB").resize((cell, cell), Image.NEAREST)).copy()
    for i, mask in enumerate(masks):
        m = F.interpolate(mask[None, None].float(), size=(cell, cell), mode="nearest")
        inner = -F.max_pool2d(-m, kernel_size=5, stride=1, padding=2)  # erosion by a 5x5 square
        edge = ((m - inner)[0, 0] > 0.5).numpy()
        base[edge] = _OUTLINE_COLOURS[(first + i) % len(_OUTLINE_COLOURS)]
    return Image.fromarray(base)


def render_subject_grid(
    references: list[Image.Image],
    reference_masks: torch.Tensor,
    scene: Image.Image,
    target_masks: torch.Tensor,
    plain_scene: Image.Image | None = None,
    *,
    cell: int = 192,
) -> Image.Image:
    """One row: each reference with its subject mask outlined, the plain scene (rehearsal) with the target masks, and
    the IR-Diffusion scene. reference_masks, target_masks: [n, h, w] in {0, 1}."""
    tiles = [
        (_outlined(r, reference_masks[i : i + 1], cell, first=i), f"reference {i + 1}")
        for i, r in enumerate(references)
    ]
    if plain_scene is not None:
        tiles.append((_outlined(plain_scene, target_masks, cell), "plain scene + masks"))
    tiles.append((scene.convert("RGB").resize((cell, cell), Image.NEAREST), "IR-Diffusion scene"))
    grid = Image.new("RGB", (len(tiles) * (cell + 4), cell + 18), "white")
    draw = ImageDraw.Draw(grid)
    for j, (tile, label) in enumerate(tiles):
        grid.paste(tile, (j * (cell + 4), 0))
        draw.text((j * (cell + 4) + 3, cell + 3), label, fill="black")
    return grid

"""The Radial Attention block mask (Li et al., "Radial Attention", arXiv 2506.19852), as the reference code builds it.

Tokens are f frames of s tokens each (n = f * s), frame-major. For a query frame i and key frame j at distance
d = |i - j|, with P = 2**bitlen(s) and g(d) = bitlen(d):

1. sink: key frames j < sink_frames are kept whole (every query sees the first frame);
2. near frames: d <= 1 is kept whole (`dense_neighbor_frames`, 1 upstream; 0 keeps only d = 0 whole);
3. frame decimation: with u(d) = P / 2**g(d), if u(d) < 128 the pair is kept only when d % floor(128 / u(d)) == 0;
4. diagonal band: otherwise token (k, l) is kept when |k - l| <= w(d) = max(block, decay_factor * u(d)), the
   distance taken in the flattened spatial index; so the window halves each time the frame distance doubles.

Block conversion is conservative ("strict shrink"): each pair's token mask is laid on a canvas at its offsets
(i*s mod block, j*s mod block); a block x block tile of it is kept when more than 60% of its non-empty columns are
more than one third filled (a partial last block is measured against the rows it has). Tiles are OR-ed into the
global [ceil(n/block)]^2 grid (frames straddle blocks when s is not a multiple of the block). Tile fills are computed
in closed form per column, and pair results are cached by (window, offsets), so 115k tokens take well under a second.

Where this differs from the upstream mask builder (on the shapes upstream runs, n a multiple of 128 and s a
multiple of the block, the two agree block for block):

- a partial last block: upstream keeps it dense; here the same rule as every other block is applied to it,
  measured against the rows it really has;
- spill-over: when a frame's offset crosses a block boundary, upstream drops the blocks of a pair's canvas that
  spill past the next frame's first block; here they are kept (OR-ed into the grid), so no band token the rule
  keeps is lost.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..validation import check_choice, check_int_range, check_number


FULL = -1  # window value meaning "the whole frame pair"
BLOCK_SIZES = (16, 32, 64, 128)  # the kernel tiles the mask can be built for (64 and 128: the fast GPU tiles)
MAX_DECAY_FACTOR = 100.0  # far past dense: every band is then wider than any frame


def _bitlen(x: int) -> int:
    return int(x).bit_length()


def pair_window(
    distance: int, tokens_per_frame: int, block_size: int, decay_factor: float, dense_neighbor_frames: int = 1
) -> int | None:
    """Band half-width for a non-sink frame pair at `distance`: FULL, an int, or None (pair dropped). A frame with
    itself and pairs up to `dense_neighbor_frames` apart are FULL (upstream: 1)."""
    if distance == 0 or distance <= dense_neighbor_frames:
        return FULL
    unit = 2 ** _bitlen(tokens_per_frame) / 2 ** _bitlen(distance)  # u(d), without the decay factor
    if unit < 128 and distance % int(128 / unit) != 0:  # 128 is hard-coded upstream, whatever the block size
        return None
    return int(max(block_size, decay_factor * unit))


@lru_cache(maxsize=4096)
def _shrunk_pair(s: int, window: int, row_offset: int, col_offset: int, block: int, tail_rows: int) -> torch.Tensor:
    """Blocks kept for one frame pair: bool [row_blocks, col_blocks] of its canvas (offsets inside the first block).

    Row k of the pair sits at canvas row row_offset + k, column l at col_offset + l. For every canvas column and
    row tile, the number of rows kept in that tile is an interval length: no token-level mask is built.
    `tail_rows` is how many rows the last row tile really has (less than a block only for the sequence's partial
    last block, which upstream never meets because it needs n to be a multiple of the block): column densities
    there are measured against those rows, so the tail keeps the blocks its frame pairs call for.
    """
    row_blocks = (row_offset + s + block - 1) // block
    col_blocks = (col_offset + s + block - 1) // block
    half = s if window == FULL else window
    l = torch.arange(s)  # noqa: E741 - l is the key token index of the paper
    tile_start = torch.arange(row_blocks).unsqueeze(1) * block - row_offset  # first k of each row tile
    lo = torch.maximum(torch.maximum(l - half, torch.zeros(1, dtype=torch.long)), tile_start)
    hi = torch.minimum(torch.minimum(l + half, torch.full((1,), s - 1)), tile_start + block - 1)
    filled = (hi - lo + 1).clamp_min(0)  # [row_blocks, s]: kept rows per (row tile, column)
    canvas = torch.zeros(row_blocks, col_blocks * block, dtype=torch.long)
    canvas[:, col_offset : col_offset + s] = filled
    tiles = canvas.view(row_blocks, col_blocks, block)
    non_empty = (tiles > 0).sum(-1)
    rows = torch.full((row_blocks, 1, 1), block)
    rows[-1] = tail_rows
    dense_cols = (tiles * 3 > rows).sum(-1)  # column density > 1/3
    return (dense_cols * 10 > non_empty * 6) & (non_empty > 0)  # more than 60% of the non-empty columns


def radial_block_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    decay_factor: float = 1.0,
    sink_frames: int = 1,
    dense_neighbor_frames: int = 1,
) -> torch.Tensor:
    """The radial block mask over the video tokens: bool [ceil(n / block), ceil(n / block)], n = frames x tokens.

    Args:
        num_frames: latent frames f (after temporal patching).
        tokens_per_frame: s, the latent tokens of one frame (height x width after patching).
        block_size: 16, 32, 64 or 128 (the attention kernel's tile; upstream builds 64 and 128 only).
        decay_factor: lambda, scales the band width (smaller: sparser).
        sink_frames: leading key frames every query attends to whole (Wan: 1; HunyuanVideo: 0).
        dense_neighbor_frames: frame pairs up to this far apart are kept whole (upstream: 1). 0 lets the band decay
            from the first neighbour on, keeping each frame with itself whole: sparser than upstream can go, whose
            band of neighbouring frames puts a floor under the density (26% at 768x1280x69 frames).
    """
    check_int_range("num_frames", num_frames, 1)
    check_int_range("tokens_per_frame", tokens_per_frame, 1)
    check_choice("block_size", block_size, BLOCK_SIZES)
    check_int_range("sink_frames", sink_frames, 0)
    check_number("decay_factor", decay_factor, 0, MAX_DECAY_FACTOR, low_open=True)
    check_int_range("dense_neighbor_frames", dense_neighbor_frames, 0)
    f, s, b = num_frames, tokens_per_frame, block_size
    num_blocks = math.ceil(f * s / b)
    tail = f * s - (num_blocks - 1) * b  # rows of the last (possibly partial) block
    mask = torch.zeros(num_blocks, num_blocks, dtype=torch.bool)
    for i in range(f):
        for j in range(f):
            distance = abs(i - j)
            window = (
                FULL if j < sink_frames else pair_window(distance, s, b, float(decay_factor), dense_neighbor_frames)
            )
            if window is None:
                continue
            r0, c0 = (i * s) // b, (j * s) // b
            ends_at_tail = r0 + ((i * s) % b + s + b - 1) // b == num_blocks
            tiles = _shrunk_pair(s, window, (i * s) % b, (j * s) % b, b, tail if ends_at_tail else b)
            r1, c1 = min(r0 + tiles.shape[0], num_blocks), min(c0 + tiles.shape[1], num_blocks)
            mask[r0:r1, c0:c1] |= tiles[: r1 - r0, : c1 - c0]
    return mask


def radial_density(mask: torch.Tensor) -> float:
    """Computed blocks over all blocks."""
    return float(mask.float().mean())


def plot_radial_mask(mask: torch.Tensor, path=None, *, tokens_per_frame: int | None = None, block_size: int = 128,
                     scale: int | None = None):  # fmt: skip
    """Render a block mask as a PNG (white: computed, dark: skipped; red lines at frame boundaries).

    Returns the PIL image; saves it when `path` is given.
    """
    from PIL import Image, ImageDraw

    grid = mask.detach().to("cpu", torch.bool)
    if grid.ndim == 3:
        grid = grid[0]
    blocks = grid.shape[0]
    scale = scale or max(1, 512 // blocks)
    pixels = (grid.to(torch.uint8) * 235 + 20).numpy()
    image = Image.fromarray(pixels, mode="L").resize((blocks * scale, blocks * scale), Image.NEAREST).convert("RGB")
    if tokens_per_frame:
        draw = ImageDraw.Draw(image)
        frame = tokens_per_frame / block_size * scale
        x = frame
        while x < blocks * scale:
            draw.line([(x, 0), (x, blocks * scale)], fill=(200, 40, 40))
            draw.line([(0, x), (blocks * scale, x)], fill=(200, 40, 40))
            x += frame
    if path is not None:
        image.save(path)
    return image

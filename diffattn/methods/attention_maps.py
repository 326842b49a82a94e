"""Cross-attention maps: where each prompt token looks in the image, per denoising step.

For the cross-attention layers at one UNet resolution (by default the level nearest 16x16 at the model's default
size, as Prompt-to-Prompt and Attend-and-Excite use), the processor computes softmax(q k^T / sqrt(d)) explicitly,
averages it over heads and over the layers of that level, and stores one map per step:
`maps: [steps, batch, tokens, h, w]`. Every other layer keeps its own processor (and SDPA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..adapters import AttentionLayer, ModelAdapter, UNetAttnProcessor
from ..control import AttentionMethod, MethodConfig
from ..kernels import attention_with_probs
from ..state import DenoiserState
from ..validation import check_bool, check_positive_int_or_pair, check_token_indices


DEFAULT_MAP_RESOLUTION = 16


@dataclass(frozen=True)
class AttentionMapConfig(MethodConfig):
    """Record cross-attention maps.

    Args:
        resolution: the attention level to record, as its size in tokens at the model's default sample size
            (int or (h, w)); None picks the level nearest 16x16.
        tokens: prompt token positions to keep (0 is the start token); None keeps every token.
        keep_grad: keep the maps in the autograd graph when the forward runs with gradients (losses on attention,
            as A-STAR and Attend-and-Excite optimise); otherwise maps are detached.
    """

    resolution: int | tuple[int, int] | None = None
    tokens: tuple[int, ...] | None = None
    keep_grad: bool = False

    def __post_init__(self):
        if self.resolution is not None:
            object.__setattr__(self, "resolution", check_positive_int_or_pair("resolution", self.resolution))
        if self.tokens is not None:
            object.__setattr__(self, "tokens", check_token_indices("tokens", self.tokens))
        check_bool("keep_grad", self.keep_grad)


class MapStore:
    """Per-run sums of head-averaged maps, keyed by (step, call within step)."""

    def __init__(self):
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.counts: dict[tuple[int, int], int] = {}

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()

    def add(self, step: int, call: int, maps: torch.Tensor) -> None:
        key = (step, call)
        if key in self.sums:
            self.sums[key] = self.sums[key] + maps
            self.counts[key] += 1
        else:
            self.sums[key] = maps
            self.counts[key] = 1


class AttentionMapProcessor(UNetAttnProcessor):
    """UNet cross-attention processor that stores head-averaged maps into a `MapStore`.

    Usable on its own with `unet.set_attn_processor`: without a `DenoiserState` the maps are stored as step 0
    and the level shape is taken as square.
    """

    def __init__(
        self,
        store: MapStore,
        state: DenoiserState | None = None,
        tokens: Sequence[int] | None = None,
        keep_grad: bool = False,
    ):
        self.store = store
        self.state = state
        self.tokens = None if tokens is None else list(tokens)
        self.keep_grad = keep_grad

    def attend(self, attn, query, key, value, attention_mask, is_cross):
        out, probs = attention_with_probs(query, key, value, scale=attn.scale, attn_mask=attention_mask)
        if is_cross:
            self._record(probs)
        return out

    def _record(self, probs: torch.Tensor) -> None:
        # probs: [B, H, Nq, Nk] -> head mean [B, Nq, T] -> [B, T, h, w]
        batch, _, num_queries, num_keys = probs.shape
        maps = (probs if self.keep_grad and probs.requires_grad else probs.detach()).mean(dim=1)
        if self.tokens is not None:
            if max(self.tokens) >= num_keys:
                raise ValueError(
                    f"AttentionMapConfig.tokens={self.tokens} names a token past the prompt length {num_keys}"
                )
            maps = maps[:, :, self.tokens]
        if self.state is not None and self.state.height > 0:
            h, w = self.state.token_grid(num_queries)
            step, call = self.state.step_index, self.state.call_index
        else:
            h = w = math.isqrt(num_queries)
            step, call = 0, 0
        self.store.add(step, call, maps.transpose(1, 2).reshape(batch, -1, h, w))


class AttentionMapMethod(AttentionMethod):
    supported_families = ("stable-diffusion-unet",)

    def __init__(self, config: AttentionMapConfig):
        super().__init__(config)
        self.store = MapStore()
        self.state: DenoiserState | None = None
        self.resolution: tuple[int, int] | None = None

    def processors(self, adapter: ModelAdapter, layers: list[AttentionLayer], state: DenoiserState):
        self.state = state
        cross = [layer for layer in layers if layer.kind == "cross"]
        sample_h, sample_w = adapter.sample_size()
        by_level: dict[tuple[int, int], list[AttentionLayer]] = {}
        for layer in cross:
            by_level.setdefault(adapter.level_size(layer), []).append(layer)
        if not by_level:
            raise ValueError(f"{type(adapter.model).__name__} has no cross-attention layers to record")
        wanted = self.config.resolution
        if wanted is None:
            target = DEFAULT_MAP_RESOLUTION * DEFAULT_MAP_RESOLUTION
            level = min(by_level, key=lambda hw: (abs(math.log(hw[0] * hw[1] / target)), -hw[0]))
        else:
            level = (wanted, wanted) if isinstance(wanted, int) else tuple(wanted)
            if level not in by_level:
                allowed = ", ".join(f"{h}x{w}" for h, w in sorted(by_level, reverse=True))
                raise ValueError(
                    f"AttentionMapConfig.resolution={wanted!r} is not a cross-attention level of this model at its "
                    f"default size {sample_h}x{sample_w}; allowed: {allowed}"
                )
        self.resolution = level
        return {
            layer.key: AttentionMapProcessor(self.store, state, self.config.tokens, self.config.keep_grad)
            for layer in by_level[level]
        }

    def begin_run(self) -> None:
        self.store.clear()

    def current(self) -> torch.Tensor:
        """Maps of the denoiser call that just ran, [batch, tokens, h, w], averaged over the level's layers (in the
        autograd graph with keep_grad)."""
        key = (self.state.step_index, self.state.call_index)
        if key not in self.store.sums:
            raise RuntimeError("no attention maps were recorded in the last denoiser call")
        return self.store.sums[key] / self.store.counts[key]

    def maps(self, call: int = -1, conditional_only: bool = False) -> torch.Tensor:
        """Maps of the last run, `[steps, batch, tokens, h, w]` (float32, CPU), averaged over heads and layers.

        Args:
            call: which denoiser call of each step to take (-1: the last, which with A-STAR-like extra passes is
                the one that produced the step's noise prediction).
            conditional_only: with batched classifier-free guidance ([uncond, cond] in one batch), keep the
                conditional half.
        """
        if not self.store.sums:
            raise RuntimeError("no attention maps recorded yet: run the pipeline after diffattn.apply(...)")
        steps = sorted({step for step, _ in self.store.sums})
        per_step = []
        for step in steps:
            calls = sorted(c for s, c in self.store.sums if s == step)
            chosen = calls[call]
            per_step.append(self.store.sums[(step, chosen)] / self.store.counts[(step, chosen)])
        maps = torch.stack(per_step).float().cpu()
        if conditional_only and self.state is not None and self.state.cfg_batched:
            maps = maps[:, maps.shape[1] // 2 :]
        return maps


AttentionMapConfig.method_class = AttentionMapMethod


def prompt_token_labels(tokenizer, prompt: str, tokens: Sequence[int] | None = None) -> list[str]:
    """The text of each token position the maps cover (padding shown as its token, e.g. <|endoftext|>)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    labels = [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids)]
    return labels if tokens is None else [labels[i] for i in tokens]


def _heat_colormap(values: np.ndarray) -> np.ndarray:
    """[..] in [0, 1] -> [.., 3] uint8, black-red-yellow-white (perceptually ordered, no matplotlib needed)."""
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def render_attention_grid(
    maps: torch.Tensor,
    image: Image.Image | None = None,
    labels: Sequence[str] | None = None,
    *,
    columns: int = 8,
    cell: int = 128,
    alpha: float = 0.6,
) -> Image.Image:
    """A grid of heatmaps, one per token, each normalised to its own max and blended over `image`.

    Args:
        maps: [tokens, h, w] (e.g. `handle.maps()[:, 0].mean(0)` for the first sample, averaged over steps).
        image: the generated image to draw under the heatmaps (optional).
        labels: one caption per token.
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be [tokens, h, w], got shape {tuple(maps.shape)}")
    num = maps.shape[0]
    if labels is not None and len(labels) != num:
        raise ValueError(f"got {len(labels)} labels for {num} maps")
    up = torch.nn.functional.interpolate(maps[:, None].float(), size=(cell, cell), mode="bilinear")[:, 0]
    low = up.flatten(1).min(dim=1).values[:, None, None]
    high = up.flatten(1).max(dim=1).values[:, None, None]
    norm = ((up - low) / (high - low).clamp_min(1e-12)).numpy()
    base = None
    if image is not None:
        base = np.asarray(image.convert("RGB").resize((cell, cell), Image.BILINEAR), dtype=np.float32)
    label_h = 16 if labels is not None else 0
    cols = min(columns, num)
    rows = math.ceil(num / cols)
    grid = Image.new("RGB", (cols * cell, rows * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(num):
        heat = _heat_colormap(norm[i]).astype(np.float32)
        tile = heat if base is None else alpha * heat + (1 - alpha) * base
        x, y = (i % cols) * cell, (i // cols) * (cell + label_h)
        grid.paste(Image.fromarray(tile.astype(np.uint8)), (x, y))
        if labels is not None:
            draw.text((x + 3, y + cell + 2), str(labels[i])[:18], fill="black")
    return grid


def render_token_map(
    token_map: torch.Tensor, image: Image.Image | None = None, label: str = "", *, size: int = 384, alpha: float = 0.6
) -> Image.Image:
    """One token's map, large, with its colour scale: token_map [h, w] -> a `size` x `size` heatmap (nearest: one
    square per attention token) blended over `image`, and a bar from the map's minimum (black) to its maximum
    (white) labelled with both values."""
    if token_map.ndim != 2:
        raise ValueError(f"token_map must be [h, w], got shape {tuple(token_map.shape)}")
    values = token_map.float().cpu()
    low, high = float(values.min()), float(values.max())
    norm = ((values - low) / max(high - low, 1e-12)).numpy()
    heat = Image.fromarray(_heat_colormap(norm)).resize((size, size), Image.NEAREST)
    tile = np.asarray(heat, dtype=np.float32)
    if image is not None:
        base = np.asarray(image.convert("RGB").resize((size, size), Image.NEAREST), dtype=np.float32)
        tile = alpha * tile + (1 - alpha) * base
    bar_h, text_h = 14, 18
    out = Image.new("RGB", (size, size + bar_h + 2 * text_h), "white")
    out.paste(Image.fromarray(tile.astype(np.uint8)), (0, text_h))
    ramp = _heat_colormap(np.linspace(0.0, 1.0, size)[None, :].repeat(bar_h, 0))
    out.paste(Image.fromarray(ramp), (0, text_h + size + 2))
    draw = ImageDraw.Draw(out)
    draw.text((3, 2), label[:60], fill="black")
    scale = f"{low:.3g}"
    draw.text((3, text_h + size + bar_h + 3), scale, fill="black")
    top = f"{high:.3g}"
    draw.text((size - 7 * len(top) - 3, text_h + size + bar_h + 3), top, fill="black")
    return out

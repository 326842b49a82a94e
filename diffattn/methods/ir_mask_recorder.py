"""Subject masks from attention, for an IR-Diffusion rehearsal run without user masks (upstream's formula past its
`sam_step`): per step, self-attention SA and cross-attention CA at one level, a subject's soft mask
(SA + SA^2 + SA^3 + SA^4) CA[:, token] / 4, averaged over steps, then thresholded by
`ir_masks.binary_subject_masks` (Otsu).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters import AttentionLayer, ModelAdapter, UNetAttnProcessor
from ..control import AttentionMethod, MethodConfig
from ..kernels import attention_with_probs
from ..state import DenoiserState
from ..validation import check_int_range


@dataclass(frozen=True)
class SubjectMaskConfig(MethodConfig):
    """Record subject masks from attention (for a rehearsal run without user masks).

    Args:
        maps: (row, token) per mask: the batch row within the conditional half and the prompt token position of
            the subject word in that row's prompt.
        resolution: the attention level (tokens per side at the model's default size); None: the level nearest
            32x32 that has both self- and cross-attention.
    """

    maps: tuple[tuple[int, int], ...]
    resolution: int | None = None

    def __post_init__(self):
        ok = isinstance(self.maps, (tuple, list)) and self.maps and all(
            isinstance(m, (tuple, list)) and len(m) == 2 and all(type(x) is int and x >= 0 for x in m)
            for m in self.maps
        )  # fmt: skip
        if not ok:
            raise ValueError(f"maps={self.maps!r} is not allowed: expected a non-empty list of (row, token) pairs")
        object.__setattr__(self, "maps", tuple(tuple(m) for m in self.maps))
        if self.resolution is not None:
            check_int_range("resolution", self.resolution, 1)


class _RecordingProcessor(UNetAttnProcessor):
    def __init__(self, recorder: "SubjectMaskRecorder"):
        self.recorder = recorder

    def attend(self, attn, query, key, value, attention_mask, is_cross):
        out, probs = attention_with_probs(query, key, value, scale=attn.scale, attn_mask=attention_mask)
        self.recorder.record(probs, is_cross)
        return out


class SubjectMaskRecorder(AttentionMethod):
    """Per step: self-attention SA [N, N] and cross-attention CA [N, tokens] averaged over heads and the level's
    layers (conditional rows); a subject's soft mask is (SA + SA^2 + SA^3 + SA^4) CA[:, token] / 4, averaged over
    the steps. `soft_masks()` returns them, each normalised to [0, 1]; `ir_masks.binary_subject_masks` thresholds
    them (Otsu)."""

    supported_families = ("stable-diffusion-unet",)

    def __init__(self, config: SubjectMaskConfig):
        super().__init__(config)
        self.state: DenoiserState | None = None
        self.grid: tuple[int, int] | None = None
        self._step: int | None = None
        self._sums: dict[bool, torch.Tensor] = {}
        self._counts: dict[bool, int] = {}
        self._total: torch.Tensor | None = None
        self._steps = 0

    def processors(self, adapter: ModelAdapter, layers: list[AttentionLayer], state: DenoiserState):
        self.state = state
        by_level: dict[tuple[int, int], list[AttentionLayer]] = {}
        for layer in layers:
            if layer.kind in ("self", "cross"):
                by_level.setdefault(adapter.level_size(layer), []).append(layer)
        levels = {hw: ls for hw, ls in by_level.items() if {l.kind for l in ls} == {"self", "cross"}}
        if not levels:
            raise ValueError(f"{type(adapter.model).__name__} has no level with both self- and cross-attention")
        if self.config.resolution is None:
            grid = min(levels, key=lambda hw: (abs(math.log(hw[0] * hw[1] / 32**2)), -hw[0]))
        else:
            matches = [hw for hw in levels if hw[0] == self.config.resolution]
            if not matches:
                allowed = ", ".join(str(h) for h, _ in sorted(levels))
                raise ValueError(
                    f"resolution={self.config.resolution} is not allowed: levels of this model: {allowed}"
                )
            grid = matches[0]
        self.grid = grid
        return {layer.key: _RecordingProcessor(self) for layer in levels[grid]}

    def begin_run(self) -> None:
        self._step, self._sums, self._counts, self._total, self._steps = None, {}, {}, None, 0

    def record(self, probs: torch.Tensor, is_cross: bool) -> None:
        # probs: [B, H, Nq, Nk] -> conditional rows (the second half under batched CFG), head mean
        step = self.state.step_index if self.state is not None else 0
        if step != self._step:
            self._fold()
            self._step = step
        probs = probs.detach().float()
        if self.state is not None and self.state.cfg_batched:
            probs = probs[probs.shape[0] // 2 :]
        mean = probs.mean(dim=1)
        self._sums[is_cross] = self._sums[is_cross] + mean if is_cross in self._sums else mean
        self._counts[is_cross] = self._counts.get(is_cross, 0) + 1

    def _fold(self) -> None:
        """Add the finished step's propagated maps to the running sum."""
        if True not in self._sums or False not in self._sums:
            self._sums, self._counts = {}, {}
            return
        sa = self._sums[False] / self._counts[False]  # [rows, N, N]
        ca = self._sums[True] / self._counts[True]  # [rows, N, tokens]
        maps = []
        for row, token in self.config.maps:
            if row >= sa.shape[0] or token >= ca.shape[2]:
                raise ValueError(f"SubjectMaskConfig.maps names row {row}, token {token} outside the batch/prompt")
            x, total = ca[row, :, token], torch.zeros_like(ca[row, :, token])
            for _ in range(4):
                x = sa[row] @ x
                total = total + x
            maps.append(total / 4)
        stacked = torch.stack(maps)
        self._total = stacked if self._total is None else self._total + stacked
        self._steps += 1
        self._sums, self._counts = {}, {}

    def soft_masks(self) -> torch.Tensor:
        """[masks, h, w] in [0, 1]: the step-averaged propagated maps, each min-max normalised."""
        self._fold()
        if self._total is None:
            raise RuntimeError("no attention was recorded: run the pipeline after applying SubjectMaskConfig")
        maps = self._total / self._steps
        low, high = maps.min(dim=1, keepdim=True).values, maps.max(dim=1, keepdim=True).values
        maps = (maps - low) / (high - low).clamp_min(1e-12)
        return maps.view(-1, *self.grid).cpu()


SubjectMaskConfig.method_class = SubjectMaskRecorder

"""IR-Diffusion: isolation and reposition attention for consistent multi-subject images (He et al., arXiv 2411.19261).

One batch holds a reference image per subject (each from the subject's own prompt) and the target scene; per
classifier-free-guidance half the rows are [ref_1, ..., ref_n, target]. Given each subject's binary mask in its
reference (M_i^ref) and in the target (M_i^tgt), resized to each layer's token grid (bilinear, Otsu threshold):

- Isolation attention (target row, every self-attention layer): a query in M_i^tgt does not attend to keys in
  M_j^tgt, j != i. Subjects cannot borrow each other's appearance; background and their own region stay visible.
- Reposition attention (target row, self-attention layers from `start_layer` in forward order, steps from
  `start_step`): reference i's tokens inside M_i^ref, cropped to its bounding box and nearest-resized onto the
  bounding box of M_i^tgt, become extra keys and values:

      O = softmax([Q K_1'^T, ..., Q K_n'^T, Q K_t^T] / sqrt(d) + B) [V_1'; ...; V_n'; V_t]

  with B = -inf in block i where the key lies outside the relocated M_i^ref or the query outside M_i^tgt (the
  query mask thinned by Bernoulli `mask_dropout`, as ConsiStory does), -inf at the isolation pairs of the target
  block, and `reference_logit_bias` added to the allowed reference logits. Relocating hidden states and then
  projecting them equals projecting and then relocating keys (to_k, to_v act per token), so K' and V' are gathers
  of the reference's own keys and values.
- Mutual cross-attention (DreamStory's, which IR-Diffusion's processor inherits; the cross-attention layers of
  the same transformer blocks, same steps): inside the subject masks the target's text attention becomes
  (1 - lam) O + lam * mean_i O_i, O_i its attention to subject i's own prompt (the reference row's text keys).

References are computed with plain attention, so they are exactly the images their prompts give alone. Masks come
from the user or from attention (`SubjectMaskRecorder`: (SA + SA^2 + SA^3 + SA^4) CA / 4 on the subject token,
averaged over steps, Otsu threshold), as the upstream code does past its `sam_step`; GroundingDINO + SAM, which
upstream uses before it, are not bundled. `diffattn.pipelines.IRDiffusionPipeline` runs the whole procedure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..adapters import AttentionLayer, ModelAdapter, UNetAttnProcessor
from ..control import AttentionMethod, MethodConfig
from ..kernels import attention_with_probs
from ..state import DenoiserState
from ..validation import check_bool, check_int_range, check_number, check_seed


UPSTREAM_START_LAYER = 36 / 70  # upstream: start_layer=36 of SDXL's 70 self-attention layers (the decoder side)
_FORWARD_ORDER = {"down": 0, "mid": 1, "up": 2}


@dataclass(frozen=True)
class IRDiffusionConfig(MethodConfig):
    """IR-Diffusion on SD 1.x / 2.x / SDXL UNets; the defaults are the upstream run script's.

    Args:
        isolation: isolation attention in the target's self-attention.
        reposition: reposition attention (the target also attends to the relocated references).
        start_layer: first self-attention layer, in forward order, with reposition and mutual cross-attention;
            None: 36/70 of the model's self-attention layers (upstream's 36 on SDXL; 8 of 16 on SD 1.x).
        start_step: first denoising step with reposition and mutual cross-attention.
        reference_logit_bias: added to the reference blocks' logits (upstream `ref_sa_lambda`).
        mask_dropout: probability that a target query pixel does not see its reference, per layer call.
        mutual_cross_attention: lam of the blend with each subject's own prompt; 0 turns it off.
        seed: seeds the mask dropout, once per pipeline run.
    """

    isolation: bool = True
    reposition: bool = True
    start_layer: int | None = None
    start_step: int = 0
    reference_logit_bias: float = 0.0
    mask_dropout: float = 0.5
    mutual_cross_attention: float = 0.9
    seed: int = 0

    def __post_init__(self):
        check_bool("isolation", self.isolation)
        check_bool("reposition", self.reposition)
        if self.start_layer is not None:
            check_int_range("start_layer", self.start_layer, 0)
        check_int_range("start_step", self.start_step, 0)
        check_number("reference_logit_bias", self.reference_logit_bias, -100.0, 100.0)
        check_number("mask_dropout", self.mask_dropout, 0.0, 0.99)
        check_number("mutual_cross_attention", self.mutual_cross_attention, 0.0, 1.0)
        check_seed("seed", self.seed)


# ---------------------------------------------------------------------------------------------------- mask geometry


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


# ------------------------------------------------------------------------------------------------------- processors


class IRSelfAttnProcessor(UNetAttnProcessor):
    """Self-attention (`attn1`) with isolation and, from its layer's start on, reposition for the target rows.

    Reference rows run plain SDPA. q, k, v: [B, H, N, D] with B = groups * (n + 1), rows [ref_1..ref_n, target]
    per group (one group per CFG branch).
    """

    def __init__(self, method: "IRDiffusionMethod", reposition: bool):
        self.method = method
        self.reposition = reposition

    def attend(self, attn, query, key, value, attention_mask, is_cross):
        method = self.method
        masks = method.level(query.shape[2], query.device)
        n = masks.num_subjects
        batch, heads, tokens, dim = query.shape
        groups = method.groups(batch, n)
        if attention_mask is not None:
            raise ValueError("IR-Diffusion's self-attention takes no attention mask (SD pipelines pass none)")
        q, k, v = (t.view(groups, n + 1, heads, tokens, dim) for t in (query, key, value))
        out = torch.empty_like(q)
        out[:, :n] = F.scaled_dot_product_attention(
            q[:, :n].flatten(0, 1), k[:, :n].flatten(0, 1), v[:, :n].flatten(0, 1)
        ).view(groups, n, heads, tokens, dim)
        keys, values = k[:, n], v[:, n]  # [g, H, N, D]
        allowed = masks.isolation if method.config.isolation else None
        bias = None
        if self.reposition and method.active_step():
            index = masks.source[None, :, None, :, None].expand(groups, n, heads, tokens, dim)
            ref_keys = k[:, :n].gather(3, index).permute(0, 2, 1, 3, 4).reshape(groups, heads, n * tokens, dim)
            ref_values = v[:, :n].gather(3, index).permute(0, 2, 1, 3, 4).reshape(groups, heads, n * tokens, dim)
            keys, values = torch.cat([ref_keys, keys], dim=2), torch.cat([ref_values, values], dim=2)
            queries = masks.target  # [n, N], thinned per call by the dropout
            if method.config.mask_dropout > 0:
                queries = queries & method.keep_queries(masks.target.shape, query.device)
            ref_allowed = (queries[:, :, None] & masks.valid[:, None, :]).permute(1, 0, 2).reshape(tokens, n * tokens)
            target_allowed = allowed if allowed is not None else torch.ones_like(masks.isolation)
            allowed = torch.cat([ref_allowed, target_allowed], dim=1)
            if method.config.reference_logit_bias != 0.0:
                logit_bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
                logit_bias[:, : n * tokens] = method.config.reference_logit_bias
                bias = logit_bias.masked_fill(~allowed, float("-inf"))
        mask = bias if bias is not None else allowed
        out[:, n] = F.scaled_dot_product_attention(q[:, n], keys, values, attn_mask=mask)
        return out.view(batch, heads, tokens, dim)


class IRCrossAttnProcessor(UNetAttnProcessor):
    """Cross-attention (`attn2`) with DreamStory's mutual cross-attention for the target rows (from its layer's
    start and `start_step`): inside M_i^tgt the output is blended with attention to subject i's own prompt."""

    def __init__(self, method: "IRDiffusionMethod"):
        self.method = method

    def attend(self, attn, query, key, value, attention_mask, is_cross):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        method = self.method
        lam = method.config.mutual_cross_attention
        if not is_cross or lam == 0.0 or not method.active_step():
            return out
        if attention_mask is not None:
            raise ValueError("IR-Diffusion's mutual cross-attention takes no text attention mask")
        masks = method.level(query.shape[2], query.device)
        n = masks.num_subjects
        batch, heads, tokens, dim = query.shape
        groups = method.groups(batch, n)
        q = query.view(groups, n + 1, heads, tokens, dim)[:, n]
        k = key.view(groups, n + 1, heads, key.shape[2], dim)[:, :n]
        v = value.view(groups, n + 1, heads, key.shape[2], dim)[:, :n]
        per_subject = F.scaled_dot_product_attention(q[:, None].expand(-1, n, -1, -1, -1), k, v)  # [g, n, H, N, D]
        weights = masks.target.to(out.dtype)  # [n, N]
        inside = masks.target.any(dim=0)
        owners = weights.sum(0).clamp_min(1)[None, None, :, None]  # subjects claiming each pixel (>= 1)
        mutual = (per_subject * weights[None, :, None, :, None]).sum(1) / owners
        out = out.view(groups, n + 1, heads, tokens, dim).clone()
        target = out[:, n]
        out[:, n] = torch.where(inside[None, None, :, None], (1 - lam) * target + lam * mutual, target)
        return out.view(batch, heads, tokens, dim)


class IRDiffusionMethod(AttentionMethod):
    """Installs the IR processors; holds the subject masks of the current generation (`set_masks`)."""

    supported_families = ("stable-diffusion-unet",)

    def __init__(self, config: IRDiffusionConfig):
        super().__init__(config)
        self.state: DenoiserState | None = None
        self.reference_masks: torch.Tensor | None = None
        self.target_masks: torch.Tensor | None = None
        self._levels: dict[tuple[int, int, torch.device], LevelMasks] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self.reposition_layers: list[str] = []

    def processors(self, adapter: ModelAdapter, layers: list[AttentionLayer], state: DenoiserState):
        self.state = state
        self_layers = sorted((l for l in layers if l.kind == "self"), key=lambda l: _FORWARD_ORDER.get(l.place, 1))
        cross_keys = {l.key for l in layers if l.kind == "cross"}
        start = self.config.start_layer
        if start is None:
            start = round(UPSTREAM_START_LAYER * len(self_layers))
        elif start >= len(self_layers):
            raise ValueError(
                f"start_layer={start} is not allowed: this UNet has {len(self_layers)} self-attention layers "
                f"(expected 0..{len(self_layers) - 1})"
            )
        installed = {}
        self.reposition_layers = []
        for position, layer in enumerate(self_layers):
            late = position >= start
            if late:
                self.reposition_layers.append(layer.key)
            if self.config.isolation or (late and self.config.reposition):
                installed[layer.key] = IRSelfAttnProcessor(self, reposition=late and self.config.reposition)
            cross = layer.key.replace("attn1.processor", "attn2.processor")
            if late and self.config.mutual_cross_attention > 0 and cross in cross_keys:
                installed[cross] = IRCrossAttnProcessor(self)
        return installed

    def set_masks(self, reference: torch.Tensor, target: torch.Tensor) -> None:
        """Subject masks of the next generations: reference, target: [n, H, W] in [0, 1] (any H, W; tensors or
        arrays), subject i's mask in reference image i and in the target."""
        reference, target = _as_masks("reference_masks", reference), _as_masks("target_masks", target)
        if reference.shape[0] != target.shape[0]:
            raise ValueError(
                f"reference_masks has {reference.shape[0]} subjects and target_masks {target.shape[0]}: one mask per "
                "subject in each"
            )
        self.reference_masks, self.target_masks = reference, target
        self._levels.clear()

    def _require_masks(self) -> None:
        if self.target_masks is None:
            raise RuntimeError(
                "IR-Diffusion has no subject masks: call handle.method(IRDiffusionMethod).set_masks(...) or use "
                "diffattn.pipelines.IRDiffusionPipeline"
            )

    @property
    def num_subjects(self) -> int:
        self._require_masks()
        return self.target_masks.shape[0]

    def level(self, num_tokens: int, device: torch.device) -> LevelMasks:
        """The masks on the token grid of a layer with `num_tokens` tokens (computed once per grid and device)."""
        self._require_masks()
        if self.state is not None and self.state.height > 0:
            h, w = self.state.token_grid(num_tokens)
        else:
            h = w = math.isqrt(num_tokens)
            if h * w != num_tokens:
                raise ValueError(f"{num_tokens} tokens are not a square grid; run the UNet through diffattn.apply")
        key = (h, w, device)
        if key not in self._levels:
            masks = level_masks(self.reference_masks, self.target_masks, h, w)
            self._levels[key] = LevelMasks(*(t.to(device) for t in vars(masks).values()))
        return self._levels[key]

    def groups(self, batch: int, num_subjects: int) -> int:
        if batch % (num_subjects + 1):
            raise ValueError(
                f"IR-Diffusion expects a batch of (references + target) per CFG branch: {num_subjects} subjects need a "
                f"multiple of {num_subjects + 1} rows, got {batch}"
            )
        return batch // (num_subjects + 1)

    def active_step(self) -> bool:
        step = self.state.step_index if self.state is not None else 0
        return max(step, 0) >= self.config.start_step

    def keep_queries(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Bernoulli(1 - mask_dropout) keep-mask for the target query masks, drawn on `device` (no host sync)."""
        if self.config.mask_dropout == 0.0:
            return torch.ones(shape, dtype=torch.bool, device=device)
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device).manual_seed(self.config.seed)
        return torch.rand(shape, generator=generator, device=device) >= self.config.mask_dropout

    def begin_run(self) -> None:
        for generator in self._generators.values():
            generator.manual_seed(self.config.seed)


IRDiffusionConfig.method_class = IRDiffusionMethod


def _as_masks(field: str, masks) -> torch.Tensor:
    tensor = torch.as_tensor(masks).float() if not isinstance(masks, torch.Tensor) else masks.float()
    if tensor.ndim != 3 or tensor.shape[0] < 1 or min(tensor.shape[1:]) < 1:
        raise ValueError(f"{field} must be [subjects, height, width], got shape {tuple(tensor.shape)}")
    if tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"{field} values must lie in [0, 1]; got [{float(tensor.min())}, {float(tensor.max())}]")
    return tensor.cpu()


# -------------------------------------------------------------------------------------- masks from attention maps


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
            isinstance(m, (tuple, list)) and len(m) == 2 and all(isinstance(x, int) and x >= 0 for x in m)
            for m in self.maps
        )  # fmt: skip
        if not ok:
            raise ValueError(f"maps={self.maps!r} is not allowed: expected a non-empty list of (row, token) pairs")
        object.__setattr__(self, "maps", tuple(tuple(m) for m in self.maps))


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
    the steps. `masks()` normalises each to [0, 1] and thresholds it (Otsu)."""

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

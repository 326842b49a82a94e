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

import torch
import torch.nn.functional as F

from ..adapters import AttentionLayer, ModelAdapter, UNetAttnProcessor
from ..control import AttentionMethod, MethodConfig
from ..state import DenoiserState
from ..validation import check_bool, check_int_range, check_number, check_seed
from .ir_masks import LevelMasks, level_masks


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
                f"IR-Diffusion expects a batch of (references + target) per CFG branch: {num_subjects} subjects need "
                "a "
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

"""Radial Attention for video diffusion transformers (Li et al., arXiv 2506.19852).

Video self-attention runs on a static block mask (`radial_mask.radial_block_mask`): dense for neighbouring
frames, a diagonal band that halves in width as the frame distance doubles, far frames decimated, plus an
attention sink. The mask depends only on the latent geometry, so it is built once per (frames, tokens per frame,
device) and reused by every layer, step, batch element and CFG branch; the block-sparse kernel computes only its
tiles. Text tokens attend and are attended densely: video queries merge a sparse pass over video keys and a dense
pass over the valid text keys through their log-sum-exps.

Schedule: the first `dense_timesteps` steps, the last `dense_last_timesteps` steps and the first `dense_layers`
attention layers run the model's own processor (its ordinary dense path), not the sparse kernel with a full mask.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters import (
    AttentionLayer,
    CogVideoXJointAttnProcessor,
    HunyuanVideoJointAttnProcessor,
    LTXVideoSelfAttnProcessor,
    MochiJointAttnProcessor,
    ModelAdapter,
    WanSelfAttnProcessor,
    attention_processors,
)
from ..adapters.ulysses import all_to_all, check_heads, text_mask_of, ulysses_group, ulysses_joint_attention
from ..control import AttentionMethod, MethodConfig
from ..kernels import BACKENDS, BlockSparseLayout, block_sparse_attention, merge_attention_outputs
from ..state import DenoiserState
from ..validation import check_choice, check_int_range, check_number
from .radial_mask import BLOCK_SIZES, MAX_DECAY_FACTOR, radial_block_mask


logger = logging.getLogger(__name__)

# Upstream defaults by family: Wan keeps the first frame as an attention sink; HunyuanVideo dropped it.
# Upstream has no CogVideoX, LTX or Mochi version; they follow Wan (a sink on the first latent frame).
DEFAULT_SINK_FRAMES = {"wan": 1, "hunyuan-video": 0, "cogvideox": 1, "ltx-video": 1, "mochi": 1}
MASK_CACHE_SIZE = 8


@dataclass(frozen=True)
class RadialAttentionConfig(MethodConfig):
    """Radial attention on the video self-attention of a video transformer.

    Args:
        dense_layers: the first N video attention layers stay dense (upstream: 1 for Wan, 0 for HunyuanVideo).
        dense_timesteps: the first N denoising steps stay dense (upstream: ~steps/4 at 1x length).
        dense_last_timesteps: the last N denoising steps stay dense too (needs the pipeline, to know the count).
        decay_factor: lambda, scales the band width (upstream: 0.2 for Wan, 0.95 for HunyuanVideo).
        block_size: the kernel tile: 64 or 128 (the fast GPU tiles), or 16 or 32 for frames of few tokens.
        sink_frames: leading frames every query attends to; None takes the family default (Wan 1, Hunyuan 0).
        backend: block-sparse backend ("auto": triton on CUDA, gather on CPU).
        dense_neighbor_frames: frame pairs up to this far apart stay whole (upstream: 1); 0 lets the band decay
            from the first neighbour on (each frame with itself stays whole), for more sparsity than upstream allows.
    """

    dense_layers: int = 1
    dense_timesteps: int = 12
    dense_last_timesteps: int = 0
    decay_factor: float = 1.0
    block_size: int = 128
    sink_frames: int | None = None
    backend: str = "auto"
    dense_neighbor_frames: int = 1

    def __post_init__(self):
        check_int_range("dense_layers", self.dense_layers, 0)
        check_int_range("dense_timesteps", self.dense_timesteps, 0)
        check_int_range("dense_last_timesteps", self.dense_last_timesteps, 0)
        check_number("decay_factor", self.decay_factor, 0, MAX_DECAY_FACTOR, low_open=True)
        check_choice("block_size", self.block_size, BLOCK_SIZES)
        if self.sink_frames is not None:
            check_int_range("sink_frames", self.sink_frames, 0)
        check_choice("backend", self.backend, BACKENDS)
        check_int_range("dense_neighbor_frames", self.dense_neighbor_frames, 0)


class RadialMaskCache:
    """Layouts keyed by (frames, tokens per frame, device), least recently used first out; a new geometry builds
    a new mask, an old one is dropped past `size` entries."""

    def __init__(self, config: RadialAttentionConfig, sink_frames: int, size: int = MASK_CACHE_SIZE):
        self.config, self.sink_frames, self.size = config, sink_frames, size
        self.layouts: OrderedDict[tuple, BlockSparseLayout] = OrderedDict()

    def get(self, frames: int, tokens_per_frame: int, device: torch.device) -> BlockSparseLayout:
        key = (frames, tokens_per_frame, str(device))
        if key in self.layouts:
            self.layouts.move_to_end(key)
            return self.layouts[key]
        mask = radial_block_mask(
            frames,
            tokens_per_frame,
            block_size=self.config.block_size,
            decay_factor=self.config.decay_factor,
            sink_frames=self.sink_frames,
            dense_neighbor_frames=self.config.dense_neighbor_frames,
        )
        layout = BlockSparseLayout(mask.to(device), self.config.block_size)
        logger.info("radial mask for %d x %d tokens: density %.3f", frames, tokens_per_frame, layout.density)
        self.layouts[key] = layout
        if len(self.layouts) > self.size:
            self.layouts.popitem(last=False)
        return layout


class _RadialSchedule:
    """Shared by a method's processors: which calls run sparse, and the mask for the current geometry."""

    def __init__(self, config: RadialAttentionConfig, state: DenoiserState, cache: RadialMaskCache):
        self.config, self.state, self.cache = config, state, cache

    def sparse_now(self) -> bool:
        state, config = self.state, self.config
        step = state.step_index
        if step < config.dense_timesteps:
            return False
        total = state.num_inference_steps
        if config.dense_last_timesteps and total is not None and step >= total - config.dense_last_timesteps:
            return False
        return True

    def layout(self, num_video_tokens: int, device: torch.device) -> BlockSparseLayout:
        state = self.state
        per_frame = state.height * state.width
        if state.frames * per_frame != num_video_tokens:
            raise RuntimeError(
                f"radial attention expected {state.frames}x{state.height}x{state.width} video tokens from the latent "
                f"geometry, the layer got {num_video_tokens}"
            )
        return self.cache.get(state.frames, per_frame, device)


def _dense_attention_with_lse(q, k, v, key_mask, scale, chunk: int = 8192):
    """q: [B, H, Nq, D]; k, v: [B, H, Nk, D]; key_mask: bool [B, Nk] or None -> out [B, H, Nq, D], lse fp32.

    Query chunks bound the score memory (video queries x text keys). Rows with no valid key get lse = -inf and a
    zero output, so an LSE merge ignores them.
    """
    outs, lses = [], []
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, device=q.device, dtype=torch.float32)
        bias = bias.masked_fill(~key_mask, float("-inf"))[:, None, None, :]
    for start in range(0, q.shape[2], chunk):
        scores = torch.matmul(q[:, :, start : start + chunk].float(), k.float().transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
        outs.append(torch.matmul(probs.to(v.dtype), v))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def radial_joint_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: BlockSparseLayout,
    video: slice,
    key_mask: torch.Tensor | None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over [video | text] (or [text | video]) tokens with the video-video part block-sparse.

    query, key, value: [B, N, H, D]; `video` is the slice of the video tokens; key_mask: bool [B, N] (True = valid)
    or None. Video queries: sparse over video keys, merged by LSE with dense attention over the other (text) keys.
    Text queries: dense over all valid keys. Returns [B, N, H, D].
    """
    n = query.shape[1]
    if (video.start, video.stop) == (0, n):  # video only (Wan, LTX self-attention): no text to merge
        return block_sparse_attention(query, key, value, layout, qkv_format="bnhd", backend=backend)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, H, N, D] views
    scale = q.shape[-1] ** -0.5
    text_idx = torch.cat([torch.arange(0, video.start), torch.arange(video.stop, n)]).to(q.device)
    qv, kv, vv = q[:, :, video], k[:, :, video], v[:, :, video]
    out_video, lse_video = block_sparse_attention(qv, kv, vv, layout, return_lse=True, backend=backend)
    kt, vt = k.index_select(2, text_idx), v.index_select(2, text_idx)
    text_mask = None if key_mask is None else key_mask.index_select(1, text_idx)
    out_text, lse_text = _dense_attention_with_lse(qv, kt, vt, text_mask, scale)
    out_video, _ = merge_attention_outputs(out_video, lse_video, out_text, lse_text)
    qt = q.index_select(2, text_idx)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out_text_queries = torch.nn.functional.scaled_dot_product_attention(qt, k, v, attn_mask=mask)
    out = torch.empty_like(q)
    out[:, :, video] = out_video.to(q.dtype)
    out.index_copy_(2, text_idx, out_text_queries)
    return out.transpose(1, 2)


class _Scheduled:
    """Mixin: sparse steps run the family processor with a radial `attend`; dense steps run the original object.

    Under diffusers' context parallelism (`transformer.enable_parallelism(config=ContextParallelConfig(
    ulysses_degree=N))`, before or after `apply`), each rank holds 1/N of the tokens: the sparse path exchanges q, k,
    v so each rank holds every token of 1/N of the heads (Ulysses), runs the mask over the whole sequence, and
    exchanges back; the dense path is the original processor, which diffusers parallelises itself.
    """

    def __init__(self, schedule: _RadialSchedule, original, parallel_config: Any = None):
        self.schedule = schedule
        self.original = original
        self._cp = None
        self._parallel_config = parallel_config

    # enable_parallelism sets `_parallel_config` on every processor that has one; the original processor this one
    # runs on dense steps gets it too, and keeps it after `remove` puts it back.
    @property
    def _parallel_config(self):
        return self._cp

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        self._cp = config
        if config is not None and hasattr(self.original, "_parallel_config"):
            self.original._parallel_config = config

    def _dispatch(self, *args, **kwargs):
        if not self.schedule.sparse_now():
            return self.original(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def _video_attention(self, query, key, value, video: slice, key_mask=None):
        group = ulysses_group(self._cp)
        if group is None:
            layout = self.schedule.layout(video.stop - video.start, query.device)
            return radial_joint_attention(query, key, value, layout, video, key_mask, self.schedule.config.backend)
        return self._ulysses_attention(query, key, value, video, key_mask, group)

    def _ulysses_attention(self, query, key, value, video: slice, key_mask, group):
        """query, key, value: [B, n (+ T), H, D], this rank's shard of the video at `video` and the whole text (the
        families' context-parallel plans keep it on every rank, before or after the video)."""
        import torch.distributed as dist

        ranks = dist.get_world_size(group)
        state = self.schedule.state
        total = state.frames * state.height * state.width
        backend = self.schedule.config.backend
        num_video = video.stop - video.start
        if num_video * ranks != total:
            raise ValueError(
                f"radial attention under context parallelism needs equal token shards: {total} video tokens over "
                f"ulysses_degree={ranks} leave this rank {num_video}"
            )
        check_heads(query.shape[2], group)
        layout = self.schedule.layout(total, query.device)
        if num_video == query.shape[1] and key_mask is None:  # video only (Wan, LTX self-attention)
            q, k, v = (all_to_all(t, group, scatter_heads=True) for t in (query, key, value))
            out = radial_joint_attention(q, k, v, layout, slice(0, total), None, backend)
            return all_to_all(out.contiguous(), group, scatter_heads=False)
        text_mask = text_mask_of(key_mask, query.shape[1] - num_video, text_first=video.start > 0)
        return ulysses_joint_attention(
            query, key, value, video, group,
            lambda q, k, v, all_video, mask: radial_joint_attention(q, k, v, layout, all_video, mask, backend),
            text_mask,
        )  # fmt: skip


# Each family keeps an explicit __call__ signature: legacy `Attention` drops keyword arguments a processor's
# signature does not name.


class RadialWanProcessor(_Scheduled, WanSelfAttnProcessor):
    """Radial attention on Wan's video self-attention (`attn1`)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        return self._dispatch(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kw)

    def attend(self, attn, query, key, value):
        return self._video_attention(query, key, value, slice(0, query.shape[1]))


class RadialHunyuanVideoProcessor(_Scheduled, HunyuanVideoJointAttnProcessor):
    """Radial attention on HunyuanVideo's joint attention ([video | text], text padding masked)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self._dispatch(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def attend(self, attn, query, key, value, num_video, key_mask):
        return self._video_attention(query, key, value, slice(0, num_video), key_mask)


class RadialCogVideoXProcessor(_Scheduled, CogVideoXJointAttnProcessor):
    """Radial attention on CogVideoX's joint attention ([text | video])."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self._dispatch(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def attend(self, attn, query, key, value, num_text):
        return self._video_attention(query, key, value, slice(num_text, query.shape[1]))


class RadialLTXVideoProcessor(_Scheduled, LTXVideoSelfAttnProcessor):
    """Radial attention on LTX-Video's video self-attention (`attn1`)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self._dispatch(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def attend(self, attn, query, key, value):
        return self._video_attention(query, key, value, slice(0, query.shape[1]))


class RadialMochiProcessor(_Scheduled, MochiJointAttnProcessor):
    """Radial attention on Mochi's joint attention ([video | valid text]; padded text outputs are zero)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        return self._dispatch(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    def attend(self, attn, query, key, value, num_video, key_mask):
        return self._video_attention(query, key, value, slice(0, num_video), key_mask)


# family -> (layer kind that carries video self-attention, processor class)
_FAMILIES = {
    "wan": ("self", RadialWanProcessor),
    "hunyuan-video": ("joint", RadialHunyuanVideoProcessor),
    "cogvideox": ("joint", RadialCogVideoXProcessor),
    "ltx-video": ("self", RadialLTXVideoProcessor),
    "mochi": ("joint", RadialMochiProcessor),
}


class RadialAttentionMethod(AttentionMethod):
    """`caches`: the mask cache of each denoiser it was applied to, by the denoiser's name (`transformer`,
    `transformer_2`); `cache`: the last one built (one denoiser: its only one)."""

    supported_families = tuple(_FAMILIES)

    def __init__(self, config: RadialAttentionConfig):
        super().__init__(config)
        self.caches: dict[str, RadialMaskCache] = {}

    @property
    def cache(self) -> RadialMaskCache | None:
        return next(reversed(self.caches.values()), None)

    def processors(self, adapter: ModelAdapter, layers: list[AttentionLayer], state: DenoiserState):
        kind, processor_cls = _FAMILIES[adapter.family]
        sink = self.config.sink_frames
        sink = DEFAULT_SINK_FRAMES[adapter.family] if sink is None else sink
        cache = RadialMaskCache(self.config, sink)
        self.caches[adapter.model_name] = cache  # one per denoiser (Wan 2.2's transformer and transformer_2)
        schedule = _RadialSchedule(self.config, state, cache)
        video_layers = [layer for layer in layers if layer.kind == kind]
        if self.config.dense_layers > len(video_layers):
            raise ValueError(
                f"RadialAttentionConfig.dense_layers={self.config.dense_layers} is not allowed: this "
                f"{type(adapter.model).__name__} has {len(video_layers)} video attention layers"
            )
        originals = attention_processors(adapter.model)
        parallel = getattr(adapter.model, "_parallel_config", None)  # enable_parallelism before apply
        return {
            layer.key: processor_cls(schedule, originals[layer.key], parallel)
            for layer in video_layers[self.config.dense_layers :]
        }


RadialAttentionConfig.method_class = RadialAttentionMethod

"""AgentSD: training-free agent attention with token merging for Stable Diffusion UNets (Han et al., ECCV 2024).

On the self-attention (`attn1`) layers of the chosen UNet level, per call:

1. match every source token to its most similar destination (one destination per stride x stride window) on the
   layer's input (post-LayerNorm: a processor does not see the block input AgentSD uses; the ranking is the same
   algorithm);
2. merge the `ratio * N` most similar sources into their destinations (ToMe): X' of N' tokens;
3. with `agent_ratio`, merge further (`agent_ratio * N`, capped at the sources) to n agent tokens, projected with
   W_q; if 2n < N' run agent attention (aggregation softmax(A K^T / sqrt d) V, broadcast
   softmax(Q A^T d^-0.15) V_A + 0.075 V), else plain attention over X';
4. project out and unmerge (merged sources copy their destination's output).

Schedule (AgentSD's): the first `agent_steps` fraction of the steps (20 of 50) uses stride 4 and agent ratio 0.95;
the rest stride 2 and agent ratio 0.5, where the agent condition fails and plain token merging runs. With
`agent_ratio=None` every step is plain token merging (tomesd's method) at `stride`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapters import AttentionLayer, ModelAdapter, attention_processors
from ..control import AttentionMethod, MethodConfig
from ..kernels import agent_attention, bipartite_matching, merge_tokens, unmerge_tokens
from ..state import DenoiserState
from ..validation import check_bool, check_choice, check_int_choices, check_int_range, check_number, check_seed


LEVELS = (1, 2, 4, 8)  # UNet downsample factors a level can be named by


@dataclass(frozen=True)
class AgentAttentionConfig(MethodConfig):
    """AgentSD on SD 1.x / 2.x / SDXL UNets; the defaults reproduce AgentSD's published schedule.

    Args:
        ratio: fraction of tokens merged away before attention (ToMe's r / N).
        agent_ratio: fraction merged to form the agents in the first phase; None: plain token merging everywhere.
        stride: destination window (stride x stride) in the first phase.
        agent_steps: fraction of the denoising steps in the first phase (AgentSD: 20 of 50).
        late_agent_ratio, late_stride: the same for the remaining steps (AgentSD: 0.5 and 2).
        agent_scale_power: p in the broadcast scale d^(-p/2) (AgentSD's k_scale2, 0.3 -> d^-0.15).
        shortcut: weight of the value shortcut (AgentSD's k_shortcut).
        levels: UNet downsample factors to apply at (1 = the full-resolution level); None: the highest-resolution
            level that has self-attention (SD 1.x: 64x64 at 512 px; SDXL: 64x64 at 1024 px).
        use_rand: random destination in each window (the window's top-left otherwise, and always for odd batches).
        seed: seeds the destination draws, once per pipeline run, so runs are reproducible. Under torch.compile the
            draws come from torch's global RNG instead (dynamo cannot trace a Generator): seed it with
            torch.manual_seed.
        attn_precision: "fp32" runs the agent softmaxes in float32 (AgentSD's setting for SD 2.1), or None.
    """

    ratio: float = 0.4
    agent_ratio: float | None = 0.95
    stride: int = 4
    agent_steps: float = 0.4
    late_agent_ratio: float | None = 0.5
    late_stride: int = 2
    agent_scale_power: float = 0.3
    shortcut: float = 0.075
    levels: tuple[int, ...] | None = None
    use_rand: bool = True
    seed: int = 0
    attn_precision: str | None = None

    def __post_init__(self):
        check_number("ratio", self.ratio, 0, 0.99)
        check_number("agent_ratio", self.agent_ratio, 0, 1, allow_none=True)
        check_number("late_agent_ratio", self.late_agent_ratio, 0, 1, allow_none=True)
        check_number("agent_steps", self.agent_steps, 0, 1)
        check_int_range("stride", self.stride, 2, 16)  # 1: every token its own destination, nothing to merge
        check_int_range("late_stride", self.late_stride, 2, 16)
        check_seed("seed", self.seed)
        check_number("shortcut", self.shortcut, 0, 10)
        check_number("agent_scale_power", self.agent_scale_power, 0, 2)
        check_bool("use_rand", self.use_rand)
        check_choice("attn_precision", self.attn_precision, (None, "fp32"))
        if self.levels is not None:
            object.__setattr__(self, "levels", check_int_choices("levels", self.levels, LEVELS))

    @classmethod
    def tome(cls, ratio: float = 0.5, **fields) -> "AgentAttentionConfig":
        """Plain token merging, tomesd's method: no agents, 2x2 destination windows, `ratio` of the tokens merged."""
        return cls(agent_ratio=None, stride=2, ratio=ratio, **fields)

    def phase(self, step: int, num_steps: int | None) -> tuple[int, float | None]:
        """(stride, agent ratio) for a step. Unknown step count (a bare UNet): the first phase throughout."""
        if self.agent_ratio is None:
            return self.stride, None
        if num_steps is None or step < round(self.agent_steps * num_steps):
            return self.stride, self.agent_ratio
        return self.late_stride, self.late_agent_ratio


class AgentAttentionProcessor:
    """UNet self-attention with token merging and agent attention (see the module docstring).

    Falls back to `original` (or plain SDPA) for calls it cannot merge: cross-attention, masks, 4-D inputs.
    """

    def __init__(self, config: AgentAttentionConfig, state: DenoiserState | None = None, original=None):
        self.config = config
        self.state = state
        self.original = original
        self._generator: torch.Generator | None = None
        self._run = -1

    def _destinations_rng(self, device: torch.device, batch: int) -> tuple[torch.Generator | None, bool]:
        """(generator, use torch's global RNG) for the random destinations."""
        if not self.config.use_rand or batch % 2 == 1:  # odd batches: top-left, as tomesd does
            return None, False
        if torch.compiler.is_compiling():  # dynamo cannot hold a Generator object: draw from the global RNG
            return None, True
        run = self.state.run_index if self.state is not None else 0
        if self._generator is None or self._generator.device != device or run != self._run:
            self._generator = torch.Generator(device=device).manual_seed(self.config.seed)
            self._run = run
        return self._generator, False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        mergeable = (
            encoder_hidden_states is None
            and attention_mask is None
            and hidden_states.ndim == 3
            and attn.spatial_norm is None
            and attn.group_norm is None
        )
        if not mergeable:
            if self.original is None:
                raise ValueError("AgentAttentionProcessor handles self-attention on [B, N, C] tokens only")
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        batch, n, _ = hidden_states.shape
        if self.state is not None and self.state.height > 0:
            h, w = self.state.token_grid(n)
            stride, agent_ratio = self.config.phase(self.state.step_index, self.state.num_inference_steps)
        else:
            h = w = math.isqrt(n)
            stride, agent_ratio = self.config.phase(0, None)
        residual = hidden_states
        generator, global_rng = self._destinations_rng(hidden_states.device, batch)
        match = bipartite_matching(hidden_states, h, w, stride, stride, generator=generator, global_rng=global_rng)
        r = min(int(n * self.config.ratio), match.num_src)
        merged = merge_tokens(hidden_states, match, r)
        heads = attn.heads
        query = attn.to_q(merged).unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, H, N', D]
        key = attn.to_k(merged).unflatten(-1, (heads, -1)).transpose(1, 2)
        value = attn.to_v(merged).unflatten(-1, (heads, -1)).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        use_agents = False
        if agent_ratio is not None:
            r_agents = min(int(n * agent_ratio), match.num_src)
            use_agents = 2 * (n - r_agents) < n - r  # AgentSD's condition: agents must be fewer than half of N'
        if use_agents:
            agent_tokens = merge_tokens(hidden_states, match, r_agents)
            agents = attn.to_q(agent_tokens).unflatten(-1, (heads, -1)).transpose(1, 2)
            if attn.norm_q is not None:
                agents = attn.norm_q(agents)
            out = agent_attention(
                query,
                key,
                value,
                agents,
                agent_scale_power=self.config.agent_scale_power,
                shortcut=self.config.shortcut,
                fp32=self.config.attn_precision == "fp32",
            )
        else:
            out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        out = unmerge_tokens(out, match, r, n)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AgentAttentionMethod(AttentionMethod):
    supported_families = ("stable-diffusion-unet",)

    def processors(self, adapter: ModelAdapter, layers: list[AttentionLayer], state: DenoiserState):
        self_layers = [layer for layer in layers if layer.kind == "self"]
        factors = {layer.key: adapter.level_factor(layer) for layer in self_layers}
        available = sorted(set(factors.values()))
        levels = self.config.levels or (available[0],)
        missing = [f for f in levels if f not in available]
        if missing:
            raise ValueError(
                f"AgentAttentionConfig.levels={self.config.levels!r} is not allowed: this UNet has self-attention "
                f"at downsample factors {available}"
            )
        originals = attention_processors(adapter.model)
        self.processors_installed = {
            layer.key: AgentAttentionProcessor(self.config, state, originals[layer.key])
            for layer in self_layers
            if factors[layer.key] in levels
        }
        return self.processors_installed


AgentAttentionConfig.method_class = AgentAttentionMethod

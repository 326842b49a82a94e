"""One method per file, each readable beside its paper."""

from .agent_attention import AgentAttentionConfig, AgentAttentionProcessor
from .attention_maps import (
    AttentionMapConfig,
    AttentionMapMethod,
    AttentionMapProcessor,
    prompt_token_labels,
    render_attention_grid,
    render_token_map,
)
from .ir_diffusion import IRCrossAttnProcessor, IRDiffusionConfig, IRDiffusionMethod, IRSelfAttnProcessor
from .ir_mask_recorder import SubjectMaskConfig
from .radial_attention import RadialAttentionConfig, radial_joint_attention
from .radial_mask import plot_radial_mask, radial_block_mask, radial_density
from .structured_guidance import StructuredCrossAttnProcessor, StructuredGuidanceConfig

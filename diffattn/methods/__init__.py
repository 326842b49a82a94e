"""One method per file, each readable beside its paper."""

from .attention_maps import (
    AttentionMapConfig,
    AttentionMapMethod,
    AttentionMapProcessor,
    prompt_token_labels,
    render_attention_grid,
)

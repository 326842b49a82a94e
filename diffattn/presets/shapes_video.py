"""The untrained `shapes-wan` model: a Wan 2.1-architecture pipeline small enough to train on the CPU.

Geometry, chosen so that radial attention is real on it: 64x64 px clips of 33 frames; the Wan VAE compresses 4x in
space (two downsamples) and 4x in time, so a clip is 9 latent frames of 16x16 latents, and the transformer's patch
(1, 1, 1) keeps every latent as a token: 256 tokens a frame, 2,304 a clip. With 256 tokens a frame the radial rule
(Li et al.) gives frame pairs at distance 2-3 a band, distances 4 and 6 a narrower one, 8 a narrower one still, and
drops the rest, so at block 32 the mask is well below dense (the README's density table); 64 tokens a frame (64 px
at 8x) would leave only neighbouring frames and the sink, which is no test of the decay.
"""

from __future__ import annotations

import torch

from ..validation import check_choice, check_int_range
from .text_tokenizers import build_t5_tokenizer
from .video import umt5_encoder


NUM_FRAMES = 33
SIZE = 64
# caption tokens: what the model trains at and the preset calls with (WanPipeline's own default is 512)
MAX_SEQUENCE_LENGTH = 32
LATENT_CHANNELS = 8
TEXT_DIM = 64
INNER_DIM = 96  # the shipped transformer's attention width (heads x head dim)
NUM_LAYERS = 4  # the shipped transformer's blocks
FFN_DIM = 256  # the shipped transformer's feed-forward width
ATTENTION_HEADS = (1, 2, 4)  # at width 96: 96-, 48- or 24-dimensional heads
DEFAULT_ATTENTION_HEADS = 4  # what the shipped weights train
WIDTH_STEP, MAX_WIDTH, MAX_LAYERS, MAX_FFN_DIM = 24, 384, 12, 2048  # a 24-multiple: even rotary parts at 4 heads
MAX_PRESET_MB = 15  # what a shipped shapes-wan preset may weigh (fp16)


def check_transformer_size(width: int, num_layers: int, ffn_dim: int) -> None:
    """Clear errors for a transformer size `build_shapes_wan` cannot build (the trainer checks it before a run)."""
    check_int_range("width", width, WIDTH_STEP, MAX_WIDTH)
    if width % WIDTH_STEP:
        raise ValueError(f"width={width} is not allowed: expected a multiple of {WIDTH_STEP} in [{WIDTH_STEP}, "
                         f"{MAX_WIDTH}] (every head split keeps Wan's rotary parts even)")  # fmt: skip
    check_int_range("num_layers", num_layers, 1, MAX_LAYERS)
    check_int_range("ffn_dim", ffn_dim, 16, MAX_FFN_DIM)


def build_shapes_wan(
    seed: int = 0,
    attention_heads: int = DEFAULT_ATTENTION_HEADS,
    width: int = INNER_DIM,
    num_layers: int = NUM_LAYERS,
    ffn_dim: int = FFN_DIM,
):
    """A seeded, untrained WanPipeline of the shapes-wan geometry (see the module docstring).

    width, num_layers, ffn_dim: the transformer's size (the shipped weights': 96, 4, 256; 0.59M parameters); the
    geometry (frames, tokens, latents) and the autoencoder and text encoder do not change with it.
    attention_heads splits the width-wide attention into heads of width / attention_heads dimensions. Wan's rotary
    embedding gives a third of each head (2 * (head_dim // 6) dimensions) to each of height and width, so 24-dim
    heads have 4 frequencies per spatial axis (1, 0.1, 0.01, 0.001 rad a token: across a 16-token frame the second
    turns 1.5 rad and the first repeats every ~6 tokens) and 48-dim heads 8 (1, 0.32, 0.1, ...). Same weights' shapes
    either way.
    """
    check_choice("attention_heads", attention_heads, ATTENTION_HEADS)
    check_transformer_size(width, num_layers, ffn_dim)
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 1, 1),
        num_attention_heads=attention_heads,
        attention_head_dim=width // attention_heads,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=64,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(
        base_dim=16,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.0] * LATENT_CHANNELS,  # measured after the autoencoder is trained (calibration)
        latents_std=[1.0] * LATENT_CHANNELS,
        scale_factor_temporal=4,
        scale_factor_spatial=4,
    )
    torch.manual_seed(seed + 2)
    # no dropout: training and sampling encode captions alike
    text_encoder = umt5_encoder(tokenizer, d_model=TEXT_DIM, d_kv=16, d_ff=128, dropout_rate=0.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )

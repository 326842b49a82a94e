"""IR-Diffusion: mask geometry against hand-computed cases and brute force, the processors against the attention
written out in the test from the paper's description (hidden-state canvases, explicit masks), the pipeline against
diffusers' own pipeline."""

import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image, ImageDraw

import diffattn
from diffattn.adapters import attention_processors
from diffattn.judge import subject_mask
from diffattn.methods.ir_diffusion import (
    IRCrossAttnProcessor,
    IRDiffusionConfig,
    IRDiffusionMethod,
    IRSelfAttnProcessor,
)
from diffattn.methods.ir_masks import otsu_mask, relocation
from diffattn.pipelines import IRDiffusionPipeline
from diffattn.scenes import COLORS, draw_shape

from helpers import load


# ------------------------------------------------------------------------------------------------------ mask geometry


def _otsu_brute_force(v: np.ndarray) -> np.ndarray:
    """Every threshold between two distinct sorted values; keep the one with the largest between-class variance."""
    best, best_t = -1.0, None
    values = np.unique(v)
    for a, b in zip(values[:-1], values[1:]):
        t = (a + b) / 2
        low, high = v[v <= t], v[v > t]
        w0, w1 = len(low) / len(v), len(high) / len(v)
        var = w0 * w1 * (low.mean() - high.mean()) ** 2
        if var > best + 1e-12:
            best, best_t = var, t
    return v > best_t


def test_otsu_mask_hand_cases_and_brute_force():
    assert otsu_mask(torch.tensor([0.1, 0.2, 0.8, 0.9])).tolist() == [False, False, True, True]
    assert otsu_mask(torch.tensor([0.0, 0.0, 0.0, 1.0])).tolist() == [False, False, False, True]
    assert otsu_mask(torch.full((5,), 0.7)).tolist() == [True] * 5  # constant: split at 0.5
    assert otsu_mask(torch.zeros(5)).tolist() == [False] * 5
    rng = np.random.default_rng(0)
    for trial in range(20):
        v = np.concatenate([rng.normal(0.2, 0.1, 30 + trial), rng.normal(0.7, 0.15, 20)]).astype(np.float32)
        np.testing.assert_array_equal(otsu_mask(torch.from_numpy(v)).numpy(), _otsu_brute_force(v))


def test_relocation_hand_computed():
    ref = torch.zeros(4, 4, dtype=torch.bool)
    ref[0:2, 0:2] = True
    ref[1, 1] = False  # the box is rows 0-1, cols 0-1, with one hole
    tgt = torch.zeros(4, 4, dtype=torch.bool)
    tgt[1:4, 2:4] = True  # a 3 x 2 box
    source, valid = relocation(ref.flatten(), tgt.flatten(), 4, 4)
    # nearest 2x2 -> 3x2: rows 0,0,1 (floor(o * 2 / 3)), cols 0,1
    expected = {(1, 2): (0, 0), (1, 3): (0, 1), (2, 2): (0, 0), (2, 3): (0, 1), (3, 2): (1, 0), (3, 3): (1, 1)}
    for (y, x), (sy, sx) in expected.items():
        assert int(source[y * 4 + x]) == sy * 4 + sx
        assert bool(valid[y * 4 + x]) == bool(ref[sy, sx])
    assert int(valid.sum()) == 5  # (3, 3) reads the hole
    empty = relocation(torch.zeros(16, dtype=torch.bool), tgt.flatten(), 4, 4)[1]
    assert not empty.any()


def test_subject_mask_finds_the_drawn_object():
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    draw_shape(draw, "circle", (8, 8, 30, 30), COLORS["red"])
    draw_shape(draw, "square", (36, 30, 58, 52), COLORS["blue"])
    truth = Image.new("L", (64, 64), 0)
    draw_shape(ImageDraw.Draw(truth), "circle", (8, 8, 30, 30), 255)
    truth = np.asarray(truth) > 127
    found = subject_mask(image, "a red circle") > 0.5
    assert (found & truth).sum() / (found | truth).sum() > 0.9
    square = subject_mask(image, "a blue square") > 0.5
    assert not (square & truth).any() and square.sum() > 300
    assert subject_mask(image, "a green star").sum() == 0


# ------------------------------------------------------------------------------------------------------- processors

H = W = 4
N = H * W


def _masks():
    """Two subjects on a 4x4 grid: reference masks (in their own images) and target masks."""
    ref = torch.zeros(2, H, W)
    ref[0, 0:2, 0:3] = 1  # subject 0: a 2 x 3 box in its reference
    ref[1, 2:4, 2:4] = 1
    ref[1, 3, 3] = 0
    tgt = torch.zeros(2, H, W)
    tgt[0, 2:4, 0:2] = 1  # moved and resized in the scene
    tgt[1, 0:2, 1:4] = 1
    return ref, tgt


def _reference_self_attention(attn, hidden, ref, tgt, n, logit_bias=0.0, reposition=True, isolation=True):
    """The paper's reposition + isolation attention for the target rows, written out: canvases of relocated reference
    hidden states, their keys/values, explicit -inf masks, softmax. hidden: [groups*(n+1), N, C]."""
    heads, d = attn.heads, attn.to_q.out_features // attn.heads
    groups = hidden.shape[0] // (n + 1)
    out = []
    for g in range(groups):
        rows = hidden[g * (n + 1) : (g + 1) * (n + 1)]
        target = rows[n]
        key_blocks, value_blocks, allowed_blocks = [], [], []
        if reposition:
            for i in range(n):
                canvas = torch.zeros_like(target).view(H, W, -1)
                relocated = torch.zeros(H, W, dtype=torch.bool)
                ys, xs = torch.nonzero(ref[i] > 0.5, as_tuple=True)
                ty, tx = torch.nonzero(tgt[i] > 0.5, as_tuple=True)
                ry0, ry1, rx0, rx1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
                ty0, ty1, tx0, tx1 = int(ty.min()), int(ty.max()), int(tx.min()), int(tx.max())
                source = rows[i].view(H, W, -1) * (ref[i] > 0.5)[:, :, None]
                for y, x in itertools.product(range(ty0, ty1 + 1), range(tx0, tx1 + 1)):
                    sy = ry0 + math.floor((y - ty0) * (ry1 - ry0 + 1) / (ty1 - ty0 + 1))
                    sx = rx0 + math.floor((x - tx0) * (rx1 - rx0 + 1) / (tx1 - tx0 + 1))
                    canvas[y, x] = source[sy, sx]
                    relocated[y, x] = bool(ref[i, sy, sx] > 0.5)
                canvas = canvas.view(N, -1)
                key_blocks.append(attn.to_k(canvas))
                value_blocks.append(attn.to_v(canvas))
                allowed = torch.zeros(N, N, dtype=torch.bool)
                for q, k in itertools.product(range(N), range(N)):
                    allowed[q, k] = bool(tgt[i].flatten()[q] > 0.5) and bool(relocated.flatten()[k])
                allowed_blocks.append(allowed)
        key_blocks.append(attn.to_k(target))
        value_blocks.append(attn.to_v(target))
        own = torch.ones(N, N, dtype=torch.bool)
        if isolation:
            subject_of = [next((i for i in range(n) if tgt[i].flatten()[p] > 0.5), None) for p in range(N)]
            for q, k in itertools.product(range(N), range(N)):
                if q != k and None not in (subject_of[q], subject_of[k]) and subject_of[q] != subject_of[k]:
                    own[q, k] = False
        allowed_blocks.append(own)
        keys, values, allowed = torch.cat(key_blocks), torch.cat(value_blocks), torch.cat(allowed_blocks, dim=1)
        bonus = torch.zeros(allowed.shape)
        bonus[:, : n * N] = logit_bias
        query = attn.to_q(target)
        head_out = []
        for h in range(heads):
            qh, kh, vh = (t[:, h * d : (h + 1) * d] for t in (query, keys, values))
            logits = (qh @ kh.T) / math.sqrt(d) + bonus
            logits = logits.masked_fill(~allowed, float("-inf"))
            head_out.append(logits.softmax(-1) @ vh)
        out.append(attn.to_out[0](torch.cat(head_out, dim=-1)))
    return torch.stack(out)


def _method(config, ref, tgt):
    method = IRDiffusionMethod(config)
    method.set_masks(ref, tgt)
    return method


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"reference_logit_bias": 1.5},
        {"isolation": False},
    ],
)
def test_self_attention_matches_the_written_out_formula(options):
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8).eval()
    ref, tgt = _masks()
    n, groups = 2, 2
    hidden = torch.randn(groups * (n + 1), N, 16)
    config = IRDiffusionConfig(mask_dropout=0.0, **options)
    processor = IRSelfAttnProcessor(_method(config, ref, tgt), reposition=True)
    with torch.no_grad():
        got = processor(attn, hidden)
        plain = AttnProcessor2_0()(attn, hidden)
        expected = _reference_self_attention(
            attn, hidden, ref, tgt, n, logit_bias=options.get("reference_logit_bias", 0.0),
            isolation=options.get("isolation", True),
        )  # fmt: skip
    got = got.view(groups, n + 1, N, 16)
    torch.testing.assert_close(got[:, n], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, :n], plain.view(groups, n + 1, N, 16)[:, :n], atol=1e-6, rtol=1e-6)


def test_isolation_alone_matches_the_formula_and_cuts_the_other_subject_off():
    torch.manual_seed(1)
    attn = Attention(16, heads=2, dim_head=8).eval()
    ref, tgt = _masks()
    hidden = torch.randn(3, N, 16)
    processor = IRSelfAttnProcessor(_method(IRDiffusionConfig(reposition=False), ref, tgt), reposition=False)
    with torch.no_grad():
        got = processor(attn, hidden)[2]
        expected = _reference_self_attention(attn, hidden, ref, tgt, 2, reposition=False)[0]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        changed = hidden.clone()
        changed[2, tgt[1].flatten() > 0.5] += 5.0  # subject 1's pixels in the target
        again = processor(attn, changed)[2]
    subject0 = tgt[0].flatten() > 0.5
    torch.testing.assert_close(again[subject0], got[subject0])  # subject 0 never looks at subject 1
    assert not torch.allclose(again[~subject0], got[~subject0])


def test_mask_dropout_is_seeded_and_thins_the_reference_queries():
    ref, tgt = _masks()
    method = _method(IRDiffusionConfig(mask_dropout=0.5, seed=3), ref, tgt)
    first = [method.keep_queries((2, 4096), torch.device("cpu")) for _ in range(2)]
    method.begin_run()
    second = [method.keep_queries((2, 4096), torch.device("cpu")) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # reseeded per run
    assert not torch.equal(first[0], first[1])  # fresh draws per layer call
    assert abs(float(first[0].float().mean()) - 0.5) < 0.03


def test_mutual_cross_attention_matches_the_formula():
    torch.manual_seed(2)
    attn = Attention(16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    ref, tgt = _masks()
    n, lam = 2, 0.9
    hidden, text = torch.randn(n + 1, N, 16), torch.randn(n + 1, 5, 12)
    processor = IRCrossAttnProcessor(_method(IRDiffusionConfig(mutual_cross_attention=lam), ref, tgt))
    with torch.no_grad():
        got = processor(attn, hidden, encoder_hidden_states=text)
        plain = AttnProcessor2_0()(attn, hidden, encoder_hidden_states=text)

        def attend(x, context):  # softmax(Q K^T / sqrt d) V per head, before the output projection
            q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
            heads = [
                ((q[:, h * 8 : h * 8 + 8] @ k[:, h * 8 : h * 8 + 8].T) / math.sqrt(8)).softmax(-1)
                @ v[:, h * 8 : h * 8 + 8]
                for h in range(2)
            ]
            return torch.cat(heads, -1)

        vanilla = attend(hidden[n], text[n])
        blended = vanilla.clone()
        for p in range(N):
            owners = [i for i in range(n) if tgt[i].flatten()[p] > 0.5]
            if owners:
                mutual = sum(attend(hidden[n][p : p + 1], text[i])[0] for i in owners) / len(owners)
                blended[p] = (1 - lam) * vanilla[p] + lam * mutual
        expected = attn.to_out[0](blended)
    torch.testing.assert_close(got[n], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:n], plain[:n], atol=1e-6, rtol=1e-6)


def test_config_and_mask_errors_name_the_field():
    with pytest.raises(ValueError, match="mask_dropout=1.5 is not allowed"):
        IRDiffusionConfig(mask_dropout=1.5)
    with pytest.raises(ValueError, match="start_layer=-1 is not allowed"):
        IRDiffusionConfig(start_layer=-1)
    with pytest.raises(ValueError, match="mutual_cross_attention=2 is not allowed"):
        IRDiffusionConfig(mutual_cross_attention=2)
    method = IRDiffusionMethod(IRDiffusionConfig())
    with pytest.raises(ValueError, match="reference_masks must be \\[subjects, height, width\\]"):
        method.set_masks(torch.ones(4, 4), torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="reference_masks has 2 subjects and target_masks 1"):
        method.set_masks(torch.ones(2, 4, 4), torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="values must lie in \\[0, 1\\]"):
        method.set_masks(torch.full((1, 4, 4), 2.0), torch.ones(1, 4, 4))
    with pytest.raises(RuntimeError, match="IR-Diffusion has no subject masks"):
        method.level(16, torch.device("cpu"))
    ref, tgt = _masks()
    processor = IRSelfAttnProcessor(_method(IRDiffusionConfig(), ref, tgt), reposition=True)
    with pytest.raises(ValueError, match="2 subjects need a multiple of 3 rows, got 4"):
        processor(Attention(16, heads=2, dim_head=8), torch.randn(4, N, 16))


# ------------------------------------------------------------------------------------------ layers of real UNet
# configs

SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}


@pytest.mark.parametrize("config, total, start", [(SDXL_UNET, 70, 36), (SD15_UNET, 16, 8)])
def test_default_start_layer_is_upstreams_36_of_70_in_forward_order(config, total, start):
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    # forward order, written out: down blocks, the mid block, up blocks
    self_keys = [k for k in attention_processors(unet) if k.endswith("attn1.processor")]
    forward = sorted(self_keys, key=lambda k: ("down_blocks", "mid_block", "up_blocks").index(k.split(".")[0]))
    assert len(forward) == total
    handle = diffattn.apply(unet, IRDiffusionConfig())
    try:
        method = handle.method(IRDiffusionMethod)
        assert method.reposition_layers == forward[start:]
        installed = handle._installed[id(unet)]
        assert set(forward) <= set(installed)  # isolation everywhere
        crosses = {k for k in installed if k.endswith("attn2.processor")}
        assert crosses == {k.replace("attn1", "attn2") for k in forward[start:]}
    finally:
        handle.remove()
    if config is SDXL_UNET:  # upstream's 36 of 70: the decoder side, past its first two transformer blocks
        assert forward[start].startswith("up_blocks.0.attentions.0.transformer_blocks.2.")


# -------------------------------------------------------------------------------------------------------------
# pipeline


@pytest.fixture(scope="module")
def ir_pipe():
    pipe = IRDiffusionPipeline(**load("tiny-sd").components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_references_are_the_plain_images_and_remove_restores(ir_pipe):
    before = dict(ir_pipe.unet.attn_processors)
    generator = torch.Generator().manual_seed(4)
    out = ir_pipe("a red cat and a blue dog", ["a red cat", "a blue dog"], num_inference_steps=2,
                  generator=generator, output_type="np")  # fmt: skip
    assert out.images.shape == (1, 128, 128, 3) and out.reference_images.shape == (2, 128, 128, 3)
    assert out.rehearsal_images is not None and out.reference_masks.shape[0] == 2
    assert set(out.reference_masks.unique().tolist()) <= {0.0, 1.0}
    after = dict(ir_pipe.unet.attn_processors)
    assert all(after[k] is before[k] for k in before)  # every processor restored
    # Independent reference: diffusers' own pipeline, each subject prompt from the shared reference noise.
    plain = StableDiffusionPipeline(**ir_pipe.components)
    plain.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(4)
    z_ref = torch.randn((1, 4, 16, 16), generator=g)
    for i, prompt in enumerate(["a red cat", "a blue dog"]):
        expected = plain(
            prompt, num_inference_steps=2, latents=z_ref.clone(), guidance_scale=7.0, output_type="np"
        ).images
        np.testing.assert_allclose(out.reference_images[i], expected[0], atol=2e-4)
    # IR changes the scene: it differs from the plain rehearsal of the same noise
    assert not np.allclose(out.images[0], out.rehearsal_images[0], atol=1e-3)


def test_pipeline_uses_given_masks_and_segmenters(ir_pipe):
    ref, tgt = _masks()
    out = ir_pipe("a cat and a dog", ["a cat", "a dog"], num_inference_steps=1, reference_masks=ref,
                  target_masks=tgt, output_type="np")  # fmt: skip
    assert out.rehearsal_images is None and torch.equal(out.target_masks, tgt)
    calls = []

    def segmenter(image, subject):
        calls.append((image.size, subject))
        mask = np.zeros((image.height, image.width), dtype=np.float32)
        mask[:64, :64] = 1.0 if subject == "a cat" else 0.0
        mask[64:, 64:] = 1.0 if subject == "a dog" else 0.0
        return mask

    out = ir_pipe("a cat and a dog", ["a cat", "a dog"], num_inference_steps=1, segmenter=segmenter, output_type="np")
    assert calls == [((128, 128), "a cat"), ((128, 128), "a dog"), ((128, 128), "a cat"), ((128, 128), "a dog")]
    assert out.target_masks.shape == (2, 128, 128) and float(out.target_masks[0, :64, :64].mean()) == 1.0
    assert float(out.target_masks[0, 64:, 64:].sum()) == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"subject_prompts": []}, "subject_prompts=[] is not allowed"),
        ({"subject_prompts": ["a frog"]}, "no noun of subject prompt 'a frog' occurs in prompt="),
        ({"subject_prompts": ["a cat"], "subject_words": ["cat", "dog"]}, "expected one word per subject (1)"),
        ({"subject_prompts": ["a cat"], "subject_words": ["frog"]}, "phrase='frog' does not occur"),
        ({"subject_prompts": ["a cat"], "reference_masks": torch.ones(2, 4, 4), "target_masks": torch.ones(2, 4, 4)},
         "the masks describe 2 subjects; subject_prompts has 1"),
        ({"subject_prompts": ["a cat"], "generator": [torch.Generator()]}, "generator must be one torch.Generator"),
    ],
)  # fmt: skip
def test_pipeline_errors(ir_pipe, kwargs, message):
    with pytest.raises(ValueError) as info:
        ir_pipe("a cat and a dog", num_inference_steps=1, output_type="np", **kwargs)
    assert message in str(info.value)


def test_xl_pipeline_runs_with_masks_from_attention():
    from diffattn.pipelines import IRDiffusionXLPipeline

    pipe = IRDiffusionXLPipeline(**load("tiny-sdxl").components)
    pipe.set_progress_bar_config(disable=True)
    before = dict(pipe.unet.attn_processors)
    out = pipe("a red cat and a blue dog", ["a red cat", "a blue dog"], num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape[0] == 1 and out.reference_images.shape[0] == 2
    assert out.reference_masks.ndim == 3 and out.reference_masks.shape[0] == 2 and out.target_masks.shape[0] == 2
    assert np.isfinite(out.images).all()
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_pipeline_loads_with_from_pretrained():
    from diffattn.presets import preset_path

    pipe = IRDiffusionPipeline.from_pretrained(str(preset_path("tiny-sd")))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat and a dog", ["a cat", "a dog"], num_inference_steps=1, output_type="np")
    assert isinstance(pipe, StableDiffusionPipeline) and out.images.shape == (1, 128, 128, 3)


@pytest.mark.gpu
def test_gpu_processors_match_the_formula_in_fp16():
    """On CUDA in fp16 (SDPA's fused kernels with a boolean mask, the dropout generator on the device): the target
    rows against the written-out formula in fp32 on the CPU."""
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8).eval()
    ref, tgt = _masks()
    hidden = torch.randn(6, N, 16)
    with torch.no_grad():
        expected = _reference_self_attention(attn, hidden, ref, tgt, 2)
        processor = IRSelfAttnProcessor(_method(IRDiffusionConfig(mask_dropout=0.0), ref, tgt), reposition=True)
        got = processor(attn.to("cuda", torch.float16), hidden.to("cuda", torch.float16)).float().cpu()
    torch.testing.assert_close(got.view(2, 3, N, 16)[:, 2], expected, atol=2e-2, rtol=2e-2)
    keep = _method(IRDiffusionConfig(mask_dropout=0.5), ref, tgt).keep_queries((2, 4096), torch.device("cuda"))
    assert keep.is_cuda and abs(float(keep.float().mean()) - 0.5) < 0.03


def test_pipeline_redraws_a_scene_that_misses_a_subject(ir_pipe):
    scenes = []

    def segmenter(image, subject):  # finds the dog in the scene only from the second rehearsal on
        mask = np.zeros((image.height, image.width), dtype=np.float32)
        is_scene = len(scenes) % 4 >= 2
        scenes.append(np.asarray(image).copy())
        if not (is_scene and subject == "a dog" and len(scenes) <= 4):
            mask[10:40, 10:40] = 1.0 if subject == "a cat" else 0.0
            mask[60:90, 60:90] = 1.0 if subject == "a dog" else 0.0
        return mask

    out = ir_pipe("a cat and a dog", ["a cat", "a dog"], num_inference_steps=1, segmenter=segmenter, scene_retries=3,
                  generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    assert len(scenes) == 8  # two rehearsals: the first scene missed the dog
    assert not np.array_equal(scenes[2], scenes[6])  # new scene noise
    np.testing.assert_array_equal(scenes[0], scenes[4])  # the references keep theirs
    assert bool(out.target_masks[1].any())
    with pytest.raises(ValueError, match="scene_retries=-1 is not allowed"):
        ir_pipe("a cat and a dog", ["a cat", "a dog"], num_inference_steps=1, scene_retries=-1)


def test_apply_with_set_masks_on_a_plain_pipeline_is_the_pipelines_final_pass(ir_pipe):
    """Script users: apply the config, set the masks, call any SD pipeline with [references..., scene]."""
    ref, tgt = _masks()
    g = torch.Generator().manual_seed(7)
    z = torch.randn((2, 4, 16, 16), generator=g)
    latents = torch.cat([z[:1], z[:1], z[1:]])
    expected = ir_pipe("a cat and a dog", ["a cat", "a dog"], num_inference_steps=2, reference_masks=ref,
                       target_masks=tgt, generator=torch.Generator().manual_seed(7), output_type="np")  # fmt: skip
    plain = StableDiffusionPipeline(**ir_pipe.components)
    plain.set_progress_bar_config(disable=True)
    with diffattn.apply(plain, IRDiffusionConfig()) as handle:
        handle.method(IRDiffusionMethod).set_masks(ref, tgt)
        got = plain(["a cat", "a dog", "a cat and a dog"], num_inference_steps=2, latents=latents, guidance_scale=7.0,
                    output_type="np").images  # fmt: skip
    np.testing.assert_allclose(got[2], expected.images[0], atol=1e-5)
    np.testing.assert_allclose(got[:2], expected.reference_images, atol=1e-5)


def test_attention_masks_follow_the_upstream_formula():
    """SubjectMaskRecorder against (SA + SA^2 + SA^3 + SA^4) CA / 4 with numpy matrix powers: per step, SA and CA
    averaged over heads and layers, the conditional rows of a batched-CFG batch, then averaged over steps and
    min-max normalised."""
    from diffattn.methods.ir_mask_recorder import SubjectMaskConfig, SubjectMaskRecorder
    from diffattn.state import DenoiserState

    rng = np.random.default_rng(0)
    state = DenoiserState(cfg_batched=True)
    recorder = SubjectMaskRecorder(SubjectMaskConfig(maps=((0, 2), (1, 4))))
    recorder.state, recorder.grid = state, (4, 4)
    recorder.begin_run()

    def probs(rows, keys):
        p = rng.random((rows, 2, 16, keys)) ** 3
        return torch.from_numpy(p / p.sum(-1, keepdims=True)).float()

    expected = np.zeros((2, 16))
    for step in range(3):
        state.step_index = step
        sa = [probs(4, 16) for _ in range(2)]  # 2 layers; batch [uncond x2, cond x2]
        ca = [probs(4, 6) for _ in range(2)]
        for s, c in zip(sa, ca):
            recorder.record(s, is_cross=False)
            recorder.record(c, is_cross=True)
        sa_mean = np.mean([s.numpy()[2:].mean(1) for s in sa], axis=0)  # [2 cond rows, 16, 16]
        ca_mean = np.mean([c.numpy()[2:].mean(1) for c in ca], axis=0)
        for m, (row, token) in enumerate([(0, 2), (1, 4)]):
            powers = sum(np.linalg.matrix_power(sa_mean[row], k) for k in range(1, 5))
            expected[m] += powers @ ca_mean[row][:, token] / 4
    expected /= 3
    expected = (expected - expected.min(1, keepdims=True)) / (
        expected.max(1, keepdims=True) - expected.min(1, keepdims=True)
    )
    np.testing.assert_allclose(recorder.soft_masks().numpy().reshape(2, 16), expected, atol=1e-5)

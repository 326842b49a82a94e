import math

import numpy as np
import pytest
import torch
from PIL import Image

import diffattn
from diffattn.methods.attention_maps import prompt_token_labels, render_attention_grid

from helpers import load, run


def _reference_maps(pipe, name, resolution_tokens, steps=3, tokens=None, **overrides):
    """Capture each cross-attention layer's inputs with plain forward pre-hooks and compute its softmax in the test."""
    captured = []  # (call number, layer, probs head-mean [B, Nq, Nk])
    call = {"n": -1}

    def on_unet(module, args, kwargs):
        call["n"] += 1

    def on_attn(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        if context is None or hidden.shape[1] != resolution_tokens:
            return
        with torch.no_grad():
            b, n, _ = hidden.shape
            heads = module.heads
            q = module.to_q(hidden).view(b, n, heads, -1).transpose(1, 2)
            k = module.to_k(context).view(b, context.shape[1], heads, -1).transpose(1, 2)
            d = q.shape[-1]
            probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(d), dim=-1)
            captured.append((call["n"], probs.mean(dim=1)))

    hooks = [pipe.unet.register_forward_pre_hook(on_unet, with_kwargs=True)]
    hooks += [
        m.register_forward_pre_hook(on_attn, with_kwargs=True)
        for n, m in pipe.unet.named_modules()
        if n.endswith("attn2")
    ]
    run(pipe, name, steps=steps, **overrides)
    for h in hooks:
        h.remove()
    per_step = []
    for step in range(steps):
        layer_maps = [p for c, p in captured if c == step]
        mean = torch.stack(layer_maps).mean(0)  # [B, Nq, Nk]
        if tokens is not None:
            mean = mean[:, :, tokens]
        side = int(math.isqrt(resolution_tokens))
        per_step.append(mean.transpose(1, 2).reshape(mean.shape[0], -1, side, side))
    return torch.stack(per_step), len([c for c, _ in captured if c == 0])


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_maps_match_plain_torch_reimplementation(name):
    pipe = load(name)
    handle = diffattn.apply(pipe, diffattn.AttentionMapConfig())
    run(pipe, name, steps=3)
    maps = handle.maps()
    handle.remove()
    side = 16  # the level nearest 16x16 at the default size
    expected, num_layers = _reference_maps(pipe, name, side * side, steps=3)
    assert num_layers >= 2  # averaged over several layers at that level
    assert maps.shape == (3, 2, 77, side, side)
    torch.testing.assert_close(maps.double(), expected, rtol=1e-4, atol=1e-6)
    # a softmax over the 77 keys: each query's weights sum to one
    torch.testing.assert_close(maps.sum(dim=2), torch.ones(3, 2, side, side), rtol=1e-5, atol=1e-5)


def test_maps_at_another_resolution_and_token_subset():
    pipe = load("tiny-sd")
    tokens = [1, 2, 4]
    handle = diffattn.apply(pipe, diffattn.AttentionMapConfig(resolution=8, tokens=tokens))
    run(pipe, "tiny-sd", steps=2)
    maps = handle.maps()
    cond = handle.maps(conditional_only=True)
    handle.remove()
    expected, _ = _reference_maps(pipe, "tiny-sd", 64, steps=2, tokens=tokens)
    assert maps.shape == (2, 2, 3, 8, 8)
    torch.testing.assert_close(maps.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cond, maps[:, 1:])  # batched CFG is [uncond, cond]


def test_maps_follow_a_non_default_size():
    pipe = load("tiny-sd")
    handle = diffattn.apply(pipe, diffattn.AttentionMapConfig())
    run(pipe, "tiny-sd", steps=1, height=192, width=128)  # latents 24x16: the same layers now see 24x16
    assert handle.maps().shape == (1, 2, 77, 24, 16)
    handle.remove()


def test_only_recorded_layers_leave_sdpa_and_output_stays_close():
    pipe = load("tiny-sd")
    baseline = run(pipe, "tiny-sd", steps=2)
    handle = diffattn.apply(pipe, diffattn.AttentionMapConfig())
    replaced = set(handle._installed[id(pipe.unet)])
    assert replaced and all(".attn2." in k or k.endswith("attn2.processor") for k in replaced)
    assert len(replaced) == 3
    out = run(pipe, "tiny-sd", steps=2)
    handle.remove()
    torch.testing.assert_close(out, baseline, rtol=0, atol=2e-3)


def test_maps_are_per_run():
    pipe = load("tiny-sd")
    handle = diffattn.apply(pipe, diffattn.AttentionMapConfig())
    run(pipe, "tiny-sd", steps=4)
    run(pipe, "tiny-sd", steps=2)
    assert handle.maps().shape[0] == 2
    handle.remove()


def test_config_validation_names_field_value_and_allowed():
    with pytest.raises(ValueError, match=r"resolution=0 is not allowed: expected a positive int"):
        diffattn.AttentionMapConfig(resolution=0)
    with pytest.raises(ValueError, match=r"resolution='16' is not allowed"):
        diffattn.AttentionMapConfig(resolution="16")
    with pytest.raises(ValueError, match=r"tokens=\[\] is not allowed"):
        diffattn.AttentionMapConfig(tokens=[])
    with pytest.raises(ValueError, match=r"tokens=\[1, -2\] is not allowed"):
        diffattn.AttentionMapConfig(tokens=[1, -2])
    assert diffattn.AttentionMapConfig(resolution=[8, 8]).resolution == (8, 8)
    pipe = load("tiny-sd")
    with pytest.raises(ValueError, match=r"resolution=7 is not a cross-attention level.*allowed: 16x16, 8x8, 4x4"):
        diffattn.apply(pipe, diffattn.AttentionMapConfig(resolution=7))
    assert not pipe.unet._forward_pre_hooks


def test_maps_before_any_run_and_token_past_prompt():
    pipe = load("tiny-sd")
    handle = diffattn.apply(pipe, diffattn.AttentionMapConfig(tokens=[80]))
    with pytest.raises(RuntimeError, match="no attention maps recorded yet"):
        handle.maps()
    with pytest.raises(ValueError, match="past the prompt length 77"):
        run(pipe, "tiny-sd", steps=1)
    handle.remove()
    spy = diffattn.apply(pipe, diffattn.AttentionMapConfig(resolution=4))
    spy.remove()
    with pytest.raises(LookupError):
        diffattn.Handle(None, [], []).maps()


def test_processor_works_with_set_attn_processor_directly():
    from diffattn.methods.attention_maps import AttentionMapProcessor, MapStore

    pipe = load("tiny-sd")
    originals = dict(pipe.unet.attn_processors)
    store = MapStore()
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    pipe.unet.set_attn_processor({**originals, key: AttentionMapProcessor(store)})
    run(pipe, "tiny-sd", steps=1)
    pipe.unet.set_attn_processor(originals)
    assert store.sums[(0, 0)].shape == (2, 77, 16, 16)


def test_token_labels_and_heatmap_grid():
    pipe = load("tiny-sd")
    labels = prompt_token_labels(pipe.tokenizer, "a red cat")
    assert labels[:5] == ["<|startoftext|>", "a", "red", "cat", "<|endoftext|>"] and len(labels) == 77
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0] = 1.0  # hot top-left
    maps[1, 3, 3] = 1.0  # hot bottom-right
    maps[2] = 0.5  # flat
    grid = render_attention_grid(maps, Image.new("RGB", (64, 64), "blue"), ["a", "b", "c"], columns=2, cell=32)
    assert grid.size == (64, 2 * (32 + 16))
    pixels = np.asarray(grid).astype(int)
    tile0, tile1 = pixels[:32, :32], pixels[:32, 32:64]
    assert tile0[:8, :8, 0].mean() > tile0[-8:, -8:, 0].mean() + 50
    assert tile1[-8:, -8:, 0].mean() > tile1[:8, :8, 0].mean() + 50
    with pytest.raises(ValueError, match="got 2 labels for 3 maps"):
        render_attention_grid(maps, None, ["a", "b"])

"""Structured diffusion guidance against explicit per-encoding attention written out in the test."""

import pytest
import torch

import diffattn

from helpers import load, run


PROMPT = "a red cat and a blue chair"
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def _capture(pipe, layer):
    """Record the inputs and output of one cross-attention module on every call."""
    module = dict(pipe.unet.named_modules())[layer]
    calls = []

    def pre(mod, args, kwargs):
        calls.append({"hidden": (args[0] if args else kwargs["hidden_states"]).detach().clone(),
                      "context": kwargs["encoder_hidden_states"].detach().clone()})  # fmt: skip

    def post(mod, args, kwargs, output):
        calls[-1]["out"] = output.detach().clone()

    hooks = [module.register_forward_pre_hook(pre, with_kwargs=True),
             module.register_forward_hook(post, with_kwargs=True)]  # fmt: skip
    return module, calls, hooks


def _encode(pipe, text):
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0][0]  # [77, D]


def _aligned(pipe, full, phrase, start, end):
    out = full.clone()
    out[start:end] = _encode(pipe, phrase)[1 : 1 + end - start]
    return out


def _attention(module, hidden, key_ctx, value_ctx):
    heads = module.heads
    q = module.to_q(hidden)
    k, v = module.to_k(key_ctx), module.to_v(value_ctx)
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    return probs, v


def _project_out(module, o):
    b, h, n, d = o.shape
    return module.to_out[0](o.transpose(1, 2).reshape(b, n, h * d))


def test_no_phrases_equals_the_plain_pipeline():
    pipe = load("tiny-sd")
    plain = run(pipe, "tiny-sd", steps=2, prompt=PROMPT)
    handle = diffattn.apply(pipe, diffattn.StructuredGuidanceConfig(phrases=()))
    same = run(pipe, "tiny-sd", steps=2, prompt=PROMPT)
    handle.remove()
    assert torch.equal(same, plain)
    assert "encode_prompt" not in vars(pipe)


@pytest.mark.parametrize("mode", ["default", "conjunction"])
def test_cross_attention_equals_explicit_average(mode):
    pipe = load("tiny-sd")
    # hand-computed spans: <start> a red cat and a blue chair -> "a red cat" = 1..4, "a blue chair" = 5..8
    assert diffattn.text.token_spans(pipe.tokenizer, PROMPT, "a red cat") == [(1, 4)]
    assert diffattn.text.token_spans(pipe.tokenizer, PROMPT, "a blue chair") == [(5, 8)]
    handle = diffattn.apply(pipe, diffattn.StructuredGuidanceConfig(mode=mode))
    module, calls, hooks = _capture(pipe, LAYER)
    run(pipe, "tiny-sd", steps=1, prompt=PROMPT)
    handle.remove()
    for h in hooks:
        h.remove()
    call = calls[0]
    full = _encode(pipe, PROMPT)
    a1 = _aligned(pipe, full, "a red cat", 1, 4)
    a2 = _aligned(pipe, full, "a blue chair", 5, 8)
    hidden = call["hidden"][1:]  # batched CFG: [uncond, cond]
    torch.testing.assert_close(call["context"][1], full)
    with torch.no_grad():
        if mode == "default":  # mean_j softmax(Q K_0^T) V_j
            outs = []
            for values in (full, a1, a2):
                probs, v = _attention(module, hidden, full[None], values[None])
                outs.append(probs @ v)
            expected = _project_out(module, torch.stack(outs).mean(0))
        else:  # mean_i softmax(Q K_i^T) V, V from every phrase aligned into the full prompt
            single = full.clone()
            single[1:4], single[5:8] = a1[1:4], a2[5:8]
            outs = []
            for keys in (full, a1, a2):
                probs, v = _attention(module, hidden, keys[None], single[None])
                outs.append(probs @ v)
            expected = _project_out(module, torch.stack(outs).mean(0))
        # the unconditional half is plain attention over its own context
        probs, v = _attention(module, call["hidden"][:1], call["context"][:1], call["context"][:1])
        expected_uncond = _project_out(module, probs @ v)
    torch.testing.assert_close(call["out"][1:], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(call["out"][:1], expected_uncond, rtol=1e-4, atol=1e-5)


def test_structured_changes_the_image_and_removes_exactly():
    pipe = load("tiny-sdxl")
    plain = run(pipe, "tiny-sdxl", steps=2, prompt=PROMPT)
    handle = diffattn.apply(pipe, diffattn.StructuredGuidanceConfig())
    structured = run(pipe, "tiny-sdxl", steps=2, prompt=PROMPT, num_images_per_prompt=2)
    handle.remove()
    assert structured.shape[0] == 2 and not torch.allclose(structured[:1], plain, atol=1e-4)
    assert torch.equal(run(pipe, "tiny-sdxl", steps=2, prompt=PROMPT), plain)


def test_structured_errors():
    with pytest.raises(ValueError, match="mode='and' is not allowed"):
        diffattn.StructuredGuidanceConfig(mode="and")
    with pytest.raises(ValueError, match="phrases='a cat' is not allowed"):
        diffattn.StructuredGuidanceConfig(phrases="a cat")
    pipe = load("tiny-sd")
    with pytest.raises(ValueError, match="needs the pipeline"):
        diffattn.apply(pipe.unet, diffattn.StructuredGuidanceConfig())
    assert not pipe.unet._forward_pre_hooks
    handle = diffattn.apply(pipe, diffattn.StructuredGuidanceConfig(phrases=["a green dog"]))
    with pytest.raises(ValueError, match="phrase='a green dog' does not occur"):
        run(pipe, "tiny-sd", steps=1, prompt=PROMPT)
    handle.remove()

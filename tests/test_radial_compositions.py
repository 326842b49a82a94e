"""Radial attention with the rest of diffusers: caching hooks, offloading and casting hooks, LoRA, torch.compile."""

import pytest
import torch

import diffattn
import diffattn.methods.radial_attention as radial

from helpers import load


GEOMETRY = {"num_frames": 33, "height": 128, "width": 128}
CONFIG = diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=2, block_size=64)


def _run(pipe, steps=6):
    return pipe("a boat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt",
                **GEOMETRY).frames  # fmt: skip


def _recording(monkeypatch):
    seen = []
    original = radial._Scheduled._dispatch

    def record(self, attn, *args, **kwargs):
        seen.append((self.schedule.state.step_index, self.schedule.sparse_now()))
        return original(self, attn, *args, **kwargs)

    monkeypatch.setattr(radial._Scheduled, "_dispatch", record)
    return seen


def _hooks(module):
    """The names of the diffusers hooks on module (kept in its private `_diffusers_hook` registry, none if absent)."""
    registry = getattr(module, "_diffusers_hook", None)
    return {} if registry is None else registry.hooks


def _cache_configs(kind):
    """(a config that never reuses, one that reuses often) of one diffusers caching hook."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    if kind == "first-block":
        return FirstBlockCacheConfig(threshold=0.0), FirstBlockCacheConfig(threshold=0.5)
    # MagCache with every step's magnitude ratio 1 (no error accumulates): it skips as often as allowed once the
    # retained first steps are done; retaining every step computes them all
    ratios = [1.0] * 12  # 6 steps, two calls each (Wan runs CFG as two calls)
    return (MagCacheConfig(num_inference_steps=6, mag_ratios=ratios, retention_ratio=1.0),
            MagCacheConfig(num_inference_steps=6, mag_ratios=ratios, retention_ratio=0.2))  # fmt: skip


@pytest.mark.parametrize("kind", ["first-block", "mag"])
def test_caching_hooks_skip_blocks_and_the_dense_steps_still_count_right(monkeypatch, kind):
    pipe = load("tiny-wan")
    seen = _recording(monkeypatch)
    never, often = _cache_configs(kind)
    with diffattn.apply(pipe, CONFIG):
        alone = _run(pipe)
        calls_alone = len(seen)
        seen.clear()
        pipe.transformer.enable_cache(never)  # the same computation
        never_cached = _run(pipe)
        pipe.transformer.disable_cache()
        seen.clear()
        pipe.transformer.enable_cache(often)
        _run(pipe)
        pipe.transformer.disable_cache()
    torch.testing.assert_close(never_cached, alone, rtol=0, atol=1e-6)
    assert len(seen) < calls_alone  # cached steps skipped blocks, so fewer attention calls
    assert all(sparse == (step >= CONFIG.dense_timesteps) for step, sparse in seen)  # steps counted by the scheduler
    assert {step for step, _ in seen} >= {0} and max(step for step, _ in seen) > CONFIG.dense_timesteps


def test_pyramid_attention_broadcast_reuses_attention_and_the_dense_steps_still_count_right(monkeypatch):
    from diffusers import PyramidAttentionBroadcastConfig

    pipe = load("tiny-wan")
    seen = _recording(monkeypatch)

    def broadcast(skip_range):
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=skip_range,
                                               spatial_attention_timestep_skip_range=(-1, 1001),
                                               current_timestep_callback=lambda: pipe.current_timestep)  # fmt: skip

    with diffattn.apply(pipe, CONFIG):
        alone = _run(pipe)
        calls_alone = len(seen)
        seen.clear()
        pipe.transformer.enable_cache(broadcast(1))  # computes every call: the same computation
        never_reused = _run(pipe)
        pipe.transformer.disable_cache()
        seen.clear()
        pipe.transformer.enable_cache(broadcast(3))  # reuses a layer's attention output twice in three calls
        reused = _run(pipe)
        pipe.transformer.disable_cache()
    assert torch.equal(never_reused, alone)
    assert 0 < len(seen) < calls_alone and not torch.equal(reused, alone)
    assert all(sparse == (step >= CONFIG.dense_timesteps) for step, sparse in seen)  # steps counted by the scheduler


def test_group_offloading_hooks_and_radial_attention_compose(monkeypatch):
    """Block-level group offloading (here onto the CPU itself, the hooks without an accelerator) wraps the blocks the
    radial processors run in: the same output as radial alone, every block's hook in place, the schedule kept."""
    pipe = load("tiny-wan")
    with diffattn.apply(pipe, CONFIG):
        alone = _run(pipe, steps=3)
    cpu = torch.device("cpu")
    pipe.transformer.enable_group_offload(cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1)
    seen = _recording(monkeypatch)
    with diffattn.apply(pipe, CONFIG):
        offloaded = _run(pipe, steps=3)
    assert all("group_offloading" in _hooks(block) for block in pipe.transformer.blocks)
    assert torch.equal(offloaded, alone)
    assert {(step, sparse) for step, sparse in seen} == {(0, False), (1, False), (2, True)}


def test_layerwise_fp8_casting_with_radial_equals_radial_on_fp8_rounded_weights():
    """`enable_layerwise_casting` stores weights in float8 and upcasts each layer as it runs; radial attention on
    such a model equals radial attention on a model whose same weights were rounded to float8 here, whichever of
    the two calls comes first."""
    outputs = []
    for cast_first in (True, False):
        cast = load("tiny-wan")
        if not cast_first:
            handle = diffattn.apply(cast, CONFIG)
        cast.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        if cast_first:
            handle = diffattn.apply(cast, CONFIG)
        with handle:
            outputs.append(_run(cast, steps=3))
    cast_layers = {name for name, module in cast.transformer.named_modules() if "layerwise_casting" in _hooks(module)}
    assert any(".attn1.to_q" in name for name in cast_layers)
    rounded = load("tiny-wan")
    with diffattn.apply(rounded, CONFIG):
        full_precision = _run(rounded, steps=3)
        with torch.no_grad():
            for name, module in rounded.transformer.named_modules():
                if name in cast_layers:
                    for param in module.parameters(recurse=False):
                        param.copy_(param.to(torch.float8_e4m3fn).float())
        reference = _run(rounded, steps=3)
    assert (reference - full_precision).abs().max() > 1e-3  # the rounding matters at all
    for stored_fp8 in outputs:
        torch.testing.assert_close(stored_fp8, reference, rtol=0, atol=1e-6)


def test_lora_loaded_with_load_lora_weights_equals_the_fused_weights(tmp_path):
    from diffusers import WanPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    source = load("tiny-wan")
    torch.manual_seed(0)
    source.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                              init_lora_weights=False))  # fmt: skip
    WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(source.transformer))
    pipe = load("tiny-wan")
    plain_radial = None
    with diffattn.apply(pipe, CONFIG):
        plain_radial = _run(pipe, steps=3)
    pipe.load_lora_weights(tmp_path)  # peft layers on the projections the radial processors call
    with diffattn.apply(pipe, CONFIG):
        with_lora = _run(pipe, steps=3)
        pipe.fuse_lora()  # the same weights merged into plain Linear layers
        fused = _run(pipe, steps=3)
    assert (with_lora - plain_radial).abs().max() > 1e-3  # the adapters take part
    torch.testing.assert_close(with_lora, fused, rtol=1e-4, atol=1e-4)


def test_the_radial_attention_path_compiles_as_one_graph():
    pipe = load("tiny-wan")
    with diffattn.apply(pipe, diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=0, block_size=64)):
        attn = pipe.transformer.blocks[0].attn1
        captured = {}

        def capture(module, args, kwargs):
            captured["hidden_states"], captured["rotary_emb"] = args[0], args[3]

        hook = attn.register_forward_pre_hook(capture, with_kwargs=True)
        _run(pipe, steps=1)
        hook.remove()
        processor = attn.processor
        assert isinstance(processor, radial.RadialWanProcessor)

        def layer(hidden_states, rotary_emb):
            return processor(attn, hidden_states, rotary_emb=rotary_emb)

        explain = torch._dynamo.explain(layer)(captured["hidden_states"], captured["rotary_emb"])
        assert explain.graph_count == 1 and explain.graph_break_count == 0
        compiled = torch.compile(layer, fullgraph=True, backend="eager")  # dynamo's whole-graph capture
        with torch.no_grad():
            torch.testing.assert_close(compiled(captured["hidden_states"], captured["rotary_emb"]),
                                       layer(captured["hidden_states"], captured["rotary_emb"]))  # fmt: skip


def test_apply_reaches_through_a_torch_compile_wrapper():
    """`pipe.transformer = torch.compile(pipe.transformer)` before apply: the processors and the step hook go on the
    module it wraps, the wrapper's call runs them (the same video as radial without the wrapper), remove restores it.
    Dynamo is switched off for the run, which checks the wrapper's routing without a 20-second capture of the model
    (captured with backend="eager", the video is the same too, checked by hand)."""
    pipe = load("tiny-wan")
    sparse = diffattn.RadialAttentionConfig(dense_layers=0, dense_timesteps=0, block_size=64)
    with diffattn.apply(pipe, sparse):
        eager = _run(pipe, steps=1)
    originals = dict(pipe.transformer.attn_processors)
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")  # dynamo's capture, no code generation
    handle = diffattn.apply(pipe, sparse)
    assert set(handle._installed) == {id(pipe.transformer._orig_mod)}
    with torch._dynamo.config.patch(disable=True):
        torch.testing.assert_close(_run(pipe, steps=1), eager, rtol=0, atol=1e-6)
    handle.remove()
    assert all(pipe.transformer._orig_mod.attn_processors[k] is v for k, v in originals.items())


@pytest.mark.gpu
def test_model_cpu_offload_builds_masks_on_the_execution_device():
    on_gpu = load("tiny-wan").to("cuda")  # the reference: the same radial run with the whole pipeline on the GPU
    with diffattn.apply(on_gpu, CONFIG):
        expected = _run(on_gpu, steps=3)
    pipe = load("tiny-wan")
    pipe.enable_model_cpu_offload()
    with diffattn.apply(pipe, CONFIG) as handle:
        offloaded = _run(pipe, steps=3)
        layouts = [layout for cache in handle.method(diffattn.RadialAttentionConfig).caches.values()
                   for layout in cache.layouts.values()]  # fmt: skip
    assert layouts and all(layout.device.type == "cuda" for layout in layouts)
    torch.testing.assert_close(offloaded.cpu(), expected.cpu(), rtol=1e-4, atol=1e-4)

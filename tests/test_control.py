import pytest
import torch

import diffattn
from diffattn.adapters import attention_processors
from diffattn.control import AttentionMethod, MethodConfig
from diffattn.presets import PRESETS

from helpers import OtherSpyConfig, SpyConfig, SpyMethod, load, run


def _snapshot(model):
    return dict(attention_processors(model)), dict(model._forward_pre_hooks)


@pytest.mark.parametrize("name", list(PRESETS))
def test_apply_then_remove_is_bit_identical(name):
    pipe = load(name)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    baseline = run(pipe, name, steps=2)
    processors, hooks = _snapshot(denoiser)
    configs = [SpyConfig()] + ([diffattn.AttentionMapConfig()] if hasattr(pipe, "unet") else [])
    handle = diffattn.apply(pipe, *configs)
    assert len(denoiser._forward_pre_hooks) == len(hooks) + 1
    applied_output = run(pipe, name, steps=2)
    assert applied_output.shape == baseline.shape
    handle.remove()
    after = run(pipe, name, steps=2)
    assert torch.equal(after, baseline)
    restored, restored_hooks = _snapshot(denoiser)
    assert restored.keys() == processors.keys()
    assert all(restored[k] is processors[k] for k in processors)
    assert restored_hooks.keys() == hooks.keys()
    assert "_diffattn_handles" not in denoiser.__dict__
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    handle.remove()  # idempotent


def _with_ip_adapter_processors(unet):
    """IP-Adapter's processor on every cross-attention layer, as `pipe.load_ip_adapter` installs it."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    processors = dict(unet.attn_processors)
    for key in processors:
        if key.endswith("attn2.processor"):
            hidden = unet.get_submodule(key[: -len(".processor")]).to_q.out_features
            processors[key] = IPAdapterAttnProcessor2_0(hidden, unet.config.cross_attention_dim, num_tokens=(4,))
    unet.set_attn_processor(processors)
    return dict(unet.attn_processors)


@pytest.mark.parametrize("config", [diffattn.AttentionMapConfig(), diffattn.StructuredGuidanceConfig()])
def test_a_method_never_replaces_an_ip_adapter_processor(config):
    pipe = load("tiny-sd")
    before = _with_ip_adapter_processors(pipe.unet)
    hooks = dict(pipe.unet._forward_pre_hooks)
    with pytest.raises(RuntimeError, match=r"attn2 holds .*IPAdapterAttnProcessor2_0.* would replace it and silently"):
        diffattn.apply(pipe, config)
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())  # nothing changed
    assert dict(pipe.unet._forward_pre_hooks) == hooks and diffattn.applied(pipe) == []
    # AgentSD replaces self-attention only: it runs beside the IP-Adapter, whose processors stay
    with diffattn.apply(pipe, diffattn.AgentAttentionConfig()) as handle:
        assert all(key.endswith("attn1.processor") for key in handle._installed[id(pipe.unet)])
        assert all(pipe.unet.attn_processors[k] is v for k, v in before.items() if k.endswith("attn2.processor"))


def test_a_processor_replaced_after_apply_stops_the_next_run_before_it_computes():
    """An IP-Adapter loaded after apply takes the cross-attention layers structured guidance controls: the next run
    stops at its first denoiser call instead of running without the method there; remove leaves the new ones."""
    pipe = load("tiny-sd")
    handle = diffattn.apply(pipe, diffattn.StructuredGuidanceConfig())
    run(pipe, "tiny-sd", steps=2)  # in place: runs
    after = _with_ip_adapter_processors(pipe.unet)
    with pytest.raises(RuntimeError, match=r"10 of the 10 attention layers .* hold another processor now .*IPAdapter"):
        run(pipe, "tiny-sd", steps=2)
    handle.remove()
    assert all(pipe.unet.attn_processors[k] is v for k, v in after.items())  # theirs stay; ours were already gone


def test_only_diffusers_plain_attention_processors_are_replaced():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    class MyProcessor(AttnProcessor2_0):  # a user's subclass may add anything
        pass

    pipe = load("tiny-sd")
    key = next(k for k in pipe.unet.attn_processors if k.endswith("attn2.processor"))
    pipe.unet.set_attn_processor({**pipe.unet.attn_processors, key: MyProcessor()})
    with pytest.raises(RuntimeError, match=rf"{key[: -len('.processor')]} holds .*MyProcessor"):
        diffattn.apply(pipe, diffattn.StructuredGuidanceConfig())
    # diffusers' own plain ones, as its public switches install them, are replaced and restored
    for switch in (lambda: pipe.unet.set_attn_processor(AttnProcessor()), pipe.enable_attention_slicing,
                   pipe.fuse_qkv_projections):  # fmt: skip
        switch()
        before = dict(pipe.unet.attn_processors)
        handle = diffattn.apply(pipe, diffattn.StructuredGuidanceConfig())
        assert all(pipe.unet.attn_processors[k] is not before[k] for k in handle._installed[id(pipe.unet)])
        handle.remove()
        assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_diffattn_remove_removes_every_handle():
    pipe = load("tiny-sd")
    originals = dict(pipe.unet.attn_processors)
    diffattn.apply(pipe, SpyConfig())
    diffattn.apply(pipe, diffattn.AttentionMapConfig())
    assert len(diffattn.applied(pipe)) == 2
    assert diffattn.remove(pipe) == 2
    assert all(pipe.unet.attn_processors[k] is v for k, v in originals.items())
    assert diffattn.applied(pipe) == []
    assert diffattn.remove(pipe) == 0


def test_handles_can_be_removed_in_any_order():
    pipe = load("tiny-sd")
    originals = dict(pipe.unet.attn_processors)
    first = diffattn.apply(pipe, diffattn.AttentionMapConfig())
    second = diffattn.apply(pipe, SpyConfig())
    map_keys = set(first._installed[id(pipe.unet)])
    spy_key, spy = next(iter(second._installed[id(pipe.unet)].items()))
    first.remove()
    assert pipe.unet.attn_processors[spy_key] is spy  # the other handle's processor stays
    assert all(pipe.unet.attn_processors[k] is originals[k] for k in map_keys)
    second.remove()
    assert all(pipe.unet.attn_processors[k] is v for k, v in originals.items())


def test_applying_twice_raises_and_leaves_model_alone():
    pipe = load("tiny-sd")
    handle = diffattn.apply(pipe, diffattn.AttentionMapConfig())
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="AttentionMapConfig is already applied"):
        diffattn.apply(pipe, diffattn.AttentionMapConfig(resolution=8))
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    handle.remove()


def test_overlapping_configs_raise_before_installing():
    pipe = load("tiny-sd")
    originals = dict(pipe.unet.attn_processors)
    hooks = dict(pipe.unet._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="both replace the processor of"):
        diffattn.apply(pipe, SpyConfig(), OtherSpyConfig())
    assert all(pipe.unet.attn_processors[k] is v for k, v in originals.items())
    assert dict(pipe.unet._forward_pre_hooks) == hooks
    with pytest.raises(ValueError, match="same config type was passed twice"):
        diffattn.apply(pipe, SpyConfig(), SpyConfig())
    handle = diffattn.apply(pipe, SpyConfig())
    with pytest.raises(RuntimeError, match="already controlled by"):
        diffattn.apply(pipe, OtherSpyConfig())
    handle.remove()


class _FailingMethod(AttentionMethod):
    def processors(self, adapter, layers, state):
        raise ValueError("FailingConfig.field=1 is not allowed")


class _FailingConfig(MethodConfig):
    method_class = _FailingMethod


def test_apply_is_all_or_nothing_when_planning_fails():
    pipe = load("tiny-sd")
    originals = dict(pipe.unet.attn_processors)
    with pytest.raises(ValueError, match="FailingConfig.field=1"):
        diffattn.apply(pipe, diffattn.AttentionMapConfig(), _FailingConfig())
    assert all(pipe.unet.attn_processors[k] is v for k, v in originals.items())
    assert not pipe.unet._forward_pre_hooks
    assert "step" not in vars(pipe.scheduler)


def test_apply_is_all_or_nothing_when_installing_fails(monkeypatch):
    pipe = load("tiny-sd")
    originals = dict(pipe.unet.attn_processors)

    def broken(*args, **kwargs):
        raise RuntimeError("hook registration failed")

    monkeypatch.setattr(pipe.unet, "register_forward_pre_hook", broken)
    with pytest.raises(RuntimeError, match="hook registration failed"):
        diffattn.apply(pipe, diffattn.AttentionMapConfig())
    assert all(pipe.unet.attn_processors[k] is v for k, v in originals.items())
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    assert diffattn.applied(pipe) == []


def test_error_paths_of_apply():
    pipe = load("tiny-sd")
    with pytest.raises(ValueError, match="needs at least one config"):
        diffattn.apply(pipe)
    with pytest.raises(TypeError, match="takes diffattn config objects, got dict"):
        diffattn.apply(pipe, {"resolution": 16})
    with pytest.raises(TypeError, match="found no denoiser in object"):
        diffattn.apply(object(), SpyConfig())
    with pytest.raises(ValueError, match="does not support Linear; supported model families"):
        diffattn.apply(torch.nn.Linear(2, 2), SpyConfig())
    wan = load("tiny-wan")
    with pytest.raises(ValueError, match="does not support the wan family.*stable-diffusion-unet"):
        diffattn.apply(wan, diffattn.AttentionMapConfig())
    assert not wan.transformer._forward_pre_hooks


def test_unsupported_model_lists_supported_families():
    from diffusers import UNet2DModel

    model = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(ValueError, match="does not support UNet2DModel; supported model families: stable-diffusion"):
        diffattn.apply(model, SpyConfig())


# ---- step tracking -----------------------------------------------------------------------------------------------


def _calls(handle):
    return handle.method(SpyMethod).log


def test_step_index_with_batched_cfg_matches_scheduler():
    pipe = load("tiny-sd")
    handle = diffattn.apply(pipe, SpyConfig())
    scheduler_steps = []

    def on_step_end(p, i, t, kwargs):
        scheduler_steps.append((i, float(t)))
        return kwargs

    run(pipe, "tiny-sd", steps=4, callback_on_step_end=on_step_end)
    log = _calls(handle)
    assert [(s, c) for s, c, *_ in log] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert [(s, t) for s, *_, t in log] == scheduler_steps  # our step i saw the scheduler's timesteps[i]
    assert all(entry[3] == 2 for entry in log)  # batched CFG doubles the batch
    assert handle.state.cfg_batched is True and handle.state.num_inference_steps == 4
    handle.remove()


def _manual_loop(pipe, steps, calls_per_step):
    """A denoising loop with several denoiser calls per step (split CFG: 2; plus extra passes: 3)."""
    unet, scheduler = pipe.unet, pipe.scheduler
    cond, uncond = pipe.encode_prompt("a red cat", "cpu", 1, True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    seen = []
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(latents, t)
        outs = [
            unet(model_in, t, encoder_hidden_states=(cond if k % 2 == 0 else uncond)).sample
            for k in range(calls_per_step)
        ]
        seen.append((i, float(t)))
        noise = outs[1] + 7.5 * (outs[0] - outs[1]) if calls_per_step > 1 else outs[0]
        latents = scheduler.step(noise, t, latents).prev_sample
    return seen


@pytest.mark.parametrize("calls_per_step", [2, 3])
@pytest.mark.parametrize("target", ["pipeline", "bare model"])
def test_step_index_with_split_cfg_and_extra_passes(calls_per_step, target):
    pipe = load("tiny-sd")
    handle = diffattn.apply(pipe if target == "pipeline" else pipe.unet, SpyConfig())
    for _ in range(2):  # the second loop is a successive run: indices start again at 0
        seen = _manual_loop(pipe, steps=3, calls_per_step=calls_per_step)
    log = _calls(handle)[-3 * calls_per_step :]
    expected = [(i, c) for i, _ in seen for c in range(calls_per_step)]
    assert [(s, c) for s, c, *_ in log] == expected
    assert [t for *_, t in log] == [t for _, t in seen for _ in range(calls_per_step)]
    assert handle.state.run_index == 2
    handle.remove()


def test_bare_model_steps_follow_per_token_timesteps_with_a_clean_conditioning_frame():
    """Wan 2.2 TI2V calls its transformer with a timestep per token, the conditioning first frame's at 0 on every
    step: a bare model (no scheduler to follow) still counts a step per new noise level, and a new run when it
    rises."""
    model = load("tiny-wan").transformer
    handle = diffattn.apply(model, SpyConfig())
    latents, text = torch.randn(1, 16, 3, 16, 16), torch.randn(1, 8, model.config.text_dim)
    first_frame = 8 * 8  # tokens of one latent frame after the (1, 2, 2) patch embedding
    for levels in ([900.0, 600.0, 300.0], [900.0, 500.0]):  # two runs
        for level in levels:
            timestep = torch.full((1, 3 * first_frame), level)
            timestep[:, :first_frame] = 0.0  # the clean conditioning frame
            for _ in range(2):  # split CFG: two calls a step
                model(latents, timestep, text)
    log = _calls(handle)
    assert [(s, c, r) for s, c, r, *_ in log] == (
        [(i, c, 1) for i in range(3) for c in range(2)] + [(i, c, 2) for i in range(2) for c in range(2)]
    )
    handle.remove()


@pytest.mark.parametrize("target", ["pipeline", "bare model"])
def test_step_index_across_successive_pipeline_calls(target):
    pipe = load("tiny-sd")
    handle = diffattn.apply(pipe if target == "pipeline" else pipe.unet, SpyConfig())
    run(pipe, "tiny-sd", steps=3)
    run(pipe, "tiny-sd", steps=5)
    log = _calls(handle)
    assert [(s, c, r) for s, c, r, *_ in log] == [(i, 0, 1) for i in range(3)] + [(i, 0, 2) for i in range(5)]
    handle.remove()


def test_step_index_survives_a_scheduler_swap():
    from diffusers import DDIMScheduler

    pipe = load("tiny-sd")
    handle = diffattn.apply(pipe, SpyConfig())
    run(pipe, "tiny-sd", steps=2)
    old = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    run(pipe, "tiny-sd", steps=3)
    run(pipe, "tiny-sd", steps=2)
    assert [(s, r) for s, _, r, *_ in _calls(handle)] == [(0, 1), (1, 1), (0, 2), (1, 2), (2, 2), (0, 3), (1, 3)]
    assert "step" not in vars(old)
    handle.remove()
    assert "step" not in vars(pipe.scheduler)


def test_wan_split_cfg_and_geometry():
    pipe = load("tiny-wan")  # WanPipeline calls the transformer twice per step (cond, then uncond)
    handle = diffattn.apply(pipe, SpyConfig())
    run(pipe, "tiny-wan", steps=3)
    log = _calls(handle)
    assert [(s, c) for s, c, *_ in log] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    # 9 frames -> (9 - 1) / 4 + 1 = 3 latent frames; 128 px / 8 (VAE) / 2 (patch) = 8 tokens
    assert {entry[3:7] for entry in log} == {(1, 3, 8, 8)}
    handle.remove()


def test_hunyuan_geometry():
    pipe = load("tiny-hunyuan-video")
    handle = diffattn.apply(pipe, SpyConfig())
    run(pipe, "tiny-hunyuan-video", steps=2, num_frames=5, height=64, width=96)
    log = _calls(handle)
    assert [(s, c) for s, c, *_ in log] == [(0, 0), (1, 0)]
    assert {entry[3:7] for entry in log} == {(1, 2, 4, 6)}
    handle.remove()


def _steps_seen(spy_method) -> list[int]:
    return sorted({entry[0] for entry in spy_method.log})


@pytest.mark.parametrize("order", ["first-applied removed first", "last-applied removed first"])
def test_stacked_handles_keep_exact_step_tracking_until_their_own_removal(order):
    pipe = load("tiny-sd")
    processors_before = dict(attention_processors(pipe.unet))
    baseline = run(pipe, "tiny-sd", steps=3)
    scheduler_before = dict(vars(pipe.scheduler))
    maps = diffattn.apply(pipe, diffattn.AttentionMapConfig())
    spy = diffattn.apply(pipe, SpyConfig())
    with pytest.raises(RuntimeError):  # a failed apply while both are active changes nothing
        diffattn.apply(pipe, OtherSpyConfig())
    first, second = (maps, spy) if order.startswith("first") else (spy, maps)
    first.remove()
    survivor = second
    run(pipe, "tiny-sd", steps=3)
    if survivor is maps:
        assert maps.maps().shape[0] == 3 and maps.state.step_index == 2 and maps.state.run_index >= 1
    else:
        method = spy.method(SpyConfig)
        method.log.clear()
        run(pipe, "tiny-sd", steps=3)
        assert _steps_seen(method) == [0, 1, 2]
    survivor.remove()
    # no wrapper or registry left behind: the instance holds what a plain run leaves, nothing else
    assert vars(pipe.scheduler).keys() == scheduler_before.keys()
    assert all(vars(pipe.scheduler)[k] is v for k, v in scheduler_before.items() if callable(v))
    assert all(attention_processors(pipe.unet)[k] is v for k, v in processors_before.items())
    assert torch.equal(run(pipe, "tiny-sd", steps=3), baseline)


class _LastLayerSpyMethod(SpyMethod):
    def processors(self, adapter, layers, state):
        from helpers import SpyProcessor

        last = layers[-1]
        return {last.key: SpyProcessor(attention_processors(adapter.model)[last.key], state, self.log)}


class _LastLayerSpyConfig(MethodConfig):
    method_class = _LastLayerSpyMethod


def test_three_stacked_handles_each_count_steps_right():
    pipe = load("tiny-sd")
    handles = [diffattn.apply(pipe, diffattn.AttentionMapConfig()), diffattn.apply(pipe, SpyConfig())]
    third = diffattn.apply(pipe, _LastLayerSpyConfig())
    run(pipe, "tiny-sd", steps=4)
    assert [h.state.step_index for h in handles + [third]] == [3, 3, 3]
    handles[1].remove()
    run(pipe, "tiny-sd", steps=2)
    assert handles[0].maps().shape[0] == 2 and third.state.step_index == 1
    third.remove()
    run(pipe, "tiny-sd", steps=3)
    assert handles[0].maps().shape[0] == 3
    handles[0].remove()
    assert "_diffattn_step_trackers" not in vars(pipe.scheduler)


def test_handle_method_takes_the_applied_config_type():
    pipe = load("tiny-sd")
    with diffattn.apply(pipe, diffattn.AttentionMapConfig()) as handle:
        assert handle.method(diffattn.AttentionMapConfig).config == diffattn.AttentionMapConfig()
        with pytest.raises(LookupError, match="no RadialAttentionConfig was applied"):
            handle.method(diffattn.RadialAttentionConfig)

"""A-STAR and Attend-and-Excite: losses against hand-computed cases, latent updates on tiny-sd."""

import math

import pytest
import torch
import torch.nn.functional as F

import diffattn
import diffattn.pipelines.astar as astar_module
from diffattn.methods.astar import (
    attend_and_excite_loss,
    binarize,
    concept_maps,
    gaussian_kernel,
    retention_loss,
    segregation_loss,
    soft_iou,
)
from diffattn.methods.attention_maps import AttentionMapMethod
from diffattn.pipelines import AStarPipeline, concept_token_indices
from diffattn.presets import preset_path


def test_losses_on_hand_computed_maps():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    c = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert soft_iou(a, b) == pytest.approx(1 / 3)  # min sum 1, total 3
    maps = torch.stack([a, b, c])[None]  # [1, 3, 2, 2]
    # pairs: (b, a) = 1/3, (c, a) = 0, (c, b) = 0
    assert segregation_loss(maps) == pytest.approx(1 / 3)
    previous = torch.stack([b, b, c])[None]
    # 1 - iou(a, b) + 1 - iou(b, b) + 1 - iou(c, c) = 2/3 + 1/2 + 1/2
    assert retention_loss(maps, previous) == pytest.approx(2 / 3 + 0.5 + 0.5)
    peaks = torch.tensor([[[[0.3]]], [[[0.8]]]]).view(1, 2, 1, 1)
    assert attend_and_excite_loss(peaks) == pytest.approx(0.7)  # worst concept: 1 - 0.3
    assert torch.equal(
        binarize(torch.tensor([[[[0.2, 0.6], [1.0, 0.4]]]]), 0.5), torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    )


def test_concept_maps_softmax_and_smoothing():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(1, 6, 4, 4, generator=g) * 0.05
    out = concept_maps(maps, [2, 4], smooth=False)
    probs = torch.softmax(maps[0, 1:5] * 100, dim=0)  # over tokens 1..4 (T - 2: the last position left out)
    torch.testing.assert_close(out[0], probs[[1, 3]])
    smooth = concept_maps(maps, [2], smooth=True)
    k = gaussian_kernel(3, 0.5)
    # the reference's kernel: 1-D weights e^-1 : 1 : e^-1, normalised (0.212 / 0.576 / 0.212)
    one_d = torch.tensor([math.exp(-1), 1.0, math.exp(-1)])
    torch.testing.assert_close(k, torch.outer(one_d, one_d) / one_d.sum() ** 2)
    assert k[0, 1] / k[1, 1] == pytest.approx(0.3679, abs=1e-4)
    with pytest.raises(ValueError, match="token_indices=\\[5\\] is not allowed"):
        concept_maps(maps, [5])
    expected = F.conv2d(F.pad(probs[[1]][None], (1, 1, 1, 1), mode="reflect"), k[None, None])
    torch.testing.assert_close(smooth, expected)


def test_concept_token_indices_by_hand():
    pipe = AStarPipeline.from_pretrained(preset_path("tiny-sd"))
    # <start>=0 a=1 red=2 cat=3 and=4 a=5 blue=6 chair=7
    assert concept_token_indices(pipe.tokenizer, "a red cat and a blue chair") == [3, 7]


def test_segregation_update_lowers_the_loss_at_the_same_step():
    pipe = AStarPipeline.from_pretrained(preset_path("tiny-sd"))
    handle = diffattn.apply(pipe, diffattn.AttentionMapConfig(keep_grad=True))
    maps_method = handle.method(AttentionMapMethod)
    cond, _ = pipe.encode_prompt("a red cat and a blue chair", "cpu", 1, False)
    pipe.scheduler.set_timesteps(4)
    t = pipe.scheduler.timesteps[0]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * pipe.scheduler.init_noise_sigma

    def seg(z):
        pipe.unet(pipe.scheduler.scale_model_input(z, t), t, encoder_hidden_states=cond)
        return segregation_loss(concept_maps(maps_method.current(), [3, 7]))

    with torch.enable_grad():
        z = latents.clone().requires_grad_(True)
        before = seg(z)
        (grad,) = torch.autograd.grad(before, z)
    after = seg((latents - 20.0 * grad).detach())
    handle.remove()
    assert grad.abs().sum() > 0
    assert float(after) < float(before)


def test_pipeline_batch_two_only_map_layers_leave_sdpa(monkeypatch):
    pipe = AStarPipeline.from_pretrained(preset_path("tiny-sd"))
    pipe.set_progress_bar_config(disable=True)
    originals = dict(pipe.unet.attn_processors)
    seen = {}
    real_apply = astar_module.apply

    def spy(*args, **kwargs):
        handle = real_apply(*args, **kwargs)
        seen["installed"] = set(handle._installed[id(pipe.unet)])
        seen["current"] = dict(pipe.unet.attn_processors)
        return handle

    monkeypatch.setattr(astar_module, "apply", spy)
    out = pipe("a red cat and a blue chair", loss="both", num_inference_steps=3, max_iter_to_alter=2,
               thresholds={0: 0.05}, max_refinement_steps=2, num_images_per_prompt=2, output_type="pt",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (2, 3, 128, 128) and torch.isfinite(out.images).all()
    assert [len(x) for x in out.losses] == [3, 1, 0]  # step 0 refined (1 + 2 tries), step 1 once, step 2 none
    assert len(seen["installed"]) == 3 and all("attn2" in k for k in seen["installed"])  # the 16x16 level only
    assert all(seen["current"][k] is v for k, v in originals.items() if k not in seen["installed"])
    assert all(pipe.unet.attn_processors[k] is v for k, v in originals.items())  # restored afterwards


def test_astar_changes_the_result_and_errors():
    pipe = AStarPipeline.from_pretrained(preset_path("tiny-sd"))
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 3, "output_type": "pt", "height": 128, "width": 128}
    plain = pipe(
        "a red cat and a blue chair", max_iter_to_alter=0, generator=torch.Generator().manual_seed(0), **kwargs
    )
    steered = pipe(
        "a red cat and a blue chair", max_iter_to_alter=2, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert not torch.allclose(plain.images, steered.images, atol=1e-4)
    assert all(x == [] for x in plain.losses)
    with pytest.raises(ValueError, match="loss='iou' is not allowed"):
        pipe("a cat", loss="iou")
    with pytest.raises(ValueError, match="found no concept tokens"):
        pipe("!!!")


def test_sdxl_pipeline_runs_with_batch_two():
    from diffattn.pipelines import AStarXLPipeline

    pipe = AStarXLPipeline.from_pretrained(preset_path("tiny-sdxl"))
    pipe.set_progress_bar_config(disable=True)
    prompt, kwargs = "a red cat and a blue chair", {"num_inference_steps": 3, "num_images_per_prompt": 2}
    plain = pipe(
        prompt, max_iter_to_alter=0, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs
    )
    moved = pipe(
        prompt, loss="both", max_iter_to_alter=2, thresholds={}, generator=torch.Generator().manual_seed(0),
        output_type="latent", **kwargs,
    )  # fmt: skip
    assert [len(x) for x in moved.losses] == [1, 1, 0] and moved.maps.shape[1] == 2
    assert (moved.images - plain.images).abs().max() > 1e-5  # the updates moved the latents
    out = pipe("a red cat", max_iter_to_alter=1, output_type="pt", **kwargs)
    assert out.images.shape == (2, 3, 256, 256) and torch.isfinite(out.images).all()


def _reference_attend_and_excite(components, prompt, indices, **kw):
    """diffusers' own StableDiffusionAttendAndExcitePipeline (the authors' recipe), with its per-step losses."""
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite import (
        pipeline_stable_diffusion_attend_and_excite as reference,
    )

    pipe = reference.StableDiffusionAttendAndExcitePipeline(
        **{k: v for k, v in components.items() if k != "image_encoder"}
    )
    pipe.set_progress_bar_config(disable=True)
    steps, current = [], []
    compute_loss = pipe._compute_loss

    def recording(max_attention_per_index):
        loss = compute_loss(max_attention_per_index)
        current.append(float(loss))
        return loss

    def end_of_step(i, t, latents):
        steps.append(list(current))
        current.clear()

    pipe._compute_loss = recording
    latents = pipe(prompt, indices, callback=end_of_step, **kw).images
    return latents, steps


@pytest.mark.parametrize(
    "max_iter, thresholds",
    [(10, {0: 0.05, 10: 0.5, 20: 0.8}), (4, {0: 0.05, 3: 0.5, 6: 0.8})],  # the second refines past max_iter too
)
def test_attend_and_excite_matches_diffusers_reference_pipeline(max_iter, thresholds):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    base = diffattn.load_pipeline("shapes-sd")
    components = {**base.components, "scheduler": DDIMScheduler.from_config(base.scheduler.config, clip_sample=False)}
    prompt = "a red circle and a blue square"
    indices = concept_token_indices(base.tokenizer, prompt)
    assert indices == [3, 7]
    kw = {"num_inference_steps": 12, "guidance_scale": 5.0, "height": 64, "width": 64, "output_type": "latent",
              "max_iter_to_alter": max_iter, "thresholds": thresholds}  # fmt: skip
    reference, reference_losses = _reference_attend_and_excite(
        components, prompt, indices, generator=torch.Generator().manual_seed(0), attn_res=(16, 16), **kw
    )
    ours_pipe = AStarPipeline(**components)
    ours_pipe.set_progress_bar_config(disable=True)
    ours = ours_pipe(prompt, indices, loss="attend_and_excite", generator=torch.Generator().manual_seed(0), **kw)
    plain_kw = {k: v for k, v in kw.items() if k not in ("max_iter_to_alter", "thresholds")}
    plain = StableDiffusionPipeline(**components)
    plain.set_progress_bar_config(disable=True)
    plain_latents = plain(prompt, generator=torch.Generator().manual_seed(0), **plain_kw).images
    effect = (reference - plain_latents).abs().max()
    assert effect > 1e-3  # the method moved the latents
    assert (ours.images - reference).abs().max() <= 0.01 * effect
    for i, step in enumerate(ours.losses):
        expected = reference_losses[i]
        if len(expected) > 2:  # the reference recomputes the step's first loss once as refinement begins
            expected = [expected[0]] + expected[2:]
        if not step:  # past max_iter_to_alter and not a refinement step: the reference computes, never uses it
            assert i >= max_iter and i not in thresholds
            continue
        assert step == pytest.approx(expected, abs=1e-5), i

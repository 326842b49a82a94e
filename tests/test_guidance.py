"""Guidance on a limited interval of steps: which steps are guided, and a pipeline call against a hand-written loop."""

import numpy as np
import pytest
import torch

from diffattn import GuidanceInterval
from diffattn.generation import generate

from helpers import load


def test_guided_steps_by_fraction_of_the_run():
    interval = GuidanceInterval(start=0.3)
    assert [i for i in range(20) if interval.guided(i, 20)] == list(range(6, 20))  # 6 / 20 = 0.3
    assert [interval.scale(i, 4, 5.0) for i in range(4)] == [1.0, 1.0, 5.0, 5.0]  # 0, 0.25 < 0.3 <= 0.5, 0.75
    assert [i for i in range(10) if GuidanceInterval(0.2, 0.6).guided(i, 10)] == [2, 3, 4, 5]


@pytest.mark.parametrize("bad", [{"start": -0.1}, {"stop": 1.5}, {"start": 0.5, "stop": 0.5}, {"start": "0.3"}])
def test_interval_validation_names_the_field(bad):
    with pytest.raises(ValueError, match="start|stop"):
        GuidanceInterval(**bad)


def test_pipeline_call_matches_a_hand_written_guidance_loop():
    """tiny-sd, 4 Euler steps, interval (0.5, 1): steps 0-1 take the conditional prediction, steps 2-3 classifier-
    free guidance at 7.5, written out here with the pipeline's public pieces."""
    pipe = load("tiny-sd")
    prompt, steps, scale = "a red cat", 4, 7.5
    kwargs = GuidanceInterval(0.5, 1.0).pipeline_kwargs(guidance_scale=scale, num_inference_steps=steps)
    got = pipe(prompt, num_inference_steps=steps, height=128, width=128, output_type="latent",
               generator=torch.Generator().manual_seed(0), **kwargs).images  # fmt: skip

    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
        scheduler = pipe.scheduler
        scheduler.set_timesteps(steps)
        latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            e_uncond, e_cond = pipe.unet(model_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            weight = scale if i >= 2 else 1.0
            latents = scheduler.step(e_uncond + weight * (e_cond - e_uncond), t, latents).prev_sample
    torch.testing.assert_close(got, latents, rtol=1e-4, atol=1e-4)
    # ... and differs from guiding every step (the interval changes the image)
    everywhere = pipe(prompt, num_inference_steps=steps, height=128, width=128, output_type="latent",
                      generator=torch.Generator().manual_seed(0), guidance_scale=scale).images  # fmt: skip
    assert (everywhere - latents).abs().max() > 1e-2


def test_generate_passes_an_interval_to_plain_and_astar_calls():
    plain = generate("shapes-sd", "a red circle", steps=4, attention_maps=False)
    assert "guidance_interval" not in plain.call_kwargs  # every step guided by default
    limited = generate("shapes-sd", "a red circle", steps=4, attention_maps=False, guidance_interval=(0.5, 1))
    assert limited.call_kwargs["guidance_interval"] == (0.5, 1)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(limited.images[0]))
    astar = generate("shapes-sd", "a red circle", steps=4, astar="astar", guidance_interval=(0.5, 1))
    assert astar.call_kwargs["guidance_interval"] == (0.5, 1) and astar.images[0].size == (64, 64)


def test_generate_refuses_an_interval_on_a_video_pipeline():
    with pytest.raises(ValueError, match="guidance_interval"):
        generate("tiny-wan", "a red cat", steps=1, guidance_interval=(0.3, 1))

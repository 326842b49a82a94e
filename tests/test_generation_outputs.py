"""What `generate` hands back is what the pipeline made: the same pixels diffusers' own PIL conversion gives, and
non-finite pixels (an overflow) refused with an error naming the model, the seed and the remedy, never saved as
black frames."""

import numpy as np
import pytest
import torch

from diffattn.generation import NonFiniteOutputError, generate
from diffattn.loading import load_pipeline


def _poisoned(pipe):
    """The autoencoder's last convolution outputs NaN: every decoded pixel is NaN."""
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
    return pipe


def test_images_are_diffusers_pixels_and_nan_images_are_refused():
    pipe = load_pipeline("shapes-sd", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    result = generate("shapes-sd", "a red circle", seed=3, steps=2, pipe=pipe, attention_maps=False)
    reference = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                     guidance_scale=result.call_kwargs["guidance_scale"], output_type="pil").images[0]  # fmt: skip
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(reference))
    with pytest.raises(NonFiniteOutputError, match=r"'shapes-sd' produced non-finite values .* seed 3 .*bfloat16"):
        generate("shapes-sd", "a red circle", seed=3, steps=2, pipe=_poisoned(pipe), attention_maps=False)


def test_nan_videos_are_refused():
    pipe = load_pipeline("shapes-wan", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    result = generate("shapes-wan", "a red circle moving right", seed=1, steps=2, num_frames=5, pipe=pipe)
    assert len(result.frames) == 5 and result.frames[0].size == (64, 64)
    kwargs = {k: v for k, v in result.call_kwargs.items() if k != "num_frames"}
    reference = pipe("a red circle moving right", num_inference_steps=2, num_frames=5, output_type="pil",
                     generator=torch.Generator().manual_seed(1), **kwargs).frames[0]  # fmt: skip
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.frames, reference, strict=True))
    with pytest.raises(NonFiniteOutputError, match=r"'shapes-wan' produced non-finite values .* seed 1 "):
        generate("shapes-wan", "a red circle moving right", seed=1, steps=2, num_frames=5, pipe=_poisoned(pipe))


def test_the_request_model_is_importable_from_the_package():
    """The README's `diffattn.GenerationRequest`, `diffattn.Limits`, `diffattn.generate` are the package's."""
    import diffattn
    from diffattn import generation, limits, request

    assert diffattn.GenerationRequest is request.GenerationRequest and diffattn.Limits is limits.Limits
    assert (diffattn.generate, diffattn.generate_batch) == (generation.generate, generation.generate_batch)
    assert diffattn.NonFiniteOutputError is NonFiniteOutputError
    assert {"GenerationRequest", "Limits", "generate", "NonFiniteOutputError"} <= set(diffattn.__all__)


@pytest.mark.parametrize("method", [{"astar": "astar"}, {"subjects": ("a red circle", "a blue square")}])
def test_astar_and_ir_diffusion_refuse_nan_images_too(method):
    """The same check on the methods that run their own pipelines (A-STAR, IR-Diffusion)."""
    pipe = load_pipeline("shapes-sd", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle and a blue square"
    result = generate("shapes-sd", prompt, seed=2, steps=2, pipe=pipe, **method)
    assert result.images[0].size == (64, 64) and result.images[0].mode == "RGB"
    assert all(image.size == (64, 64) for image in result.reference_images + result.plain_images)
    with pytest.raises(NonFiniteOutputError, match=r"'shapes-sd' produced non-finite values .* seed 2 "):
        generate("shapes-sd", prompt, seed=2, steps=2, pipe=_poisoned(pipe), **method)


@pytest.mark.parametrize("size", [(64, 64), (72, 40)])
def test_a_saved_video_holds_the_frames_pixels(tmp_path, size):
    """The MP4 decodes to the frames it was written from (lossy H.264: close, not equal), at their own size: not
    colour-inverted (uint8 frames scaled by 255 wrap around) and not rescaled."""
    iio = pytest.importorskip("imageio.v3")
    from diffattn.generation import GenerationResult
    from diffattn.judge import judge_clip
    from diffattn.outputs import result_files, video_export_available
    from diffattn.scenes import render_clip

    if not video_export_available():
        pytest.skip("needs the video extra")
    clip = render_clip(5, 17)
    frames = [f.resize(size) for f in clip.frames]
    result = GenerationResult("shapes-wan", clip.caption, 5, "video", frames=frames)
    (name, write), *_ = result_files(result, "clip")
    assert name == "clip.mp4"
    write(tmp_path / name)
    decoded = iio.imread(tmp_path / name)
    written = np.stack([np.asarray(f) for f in frames])
    assert decoded.shape == written.shape  # [17, H, W, 3]
    error = np.abs(decoded.astype(np.int16) - written.astype(np.int16))
    assert error.mean() < 6 and np.median(error) <= 2
    if size == (64, 64):  # the judge reads the decoded clip as the rendered one
        from PIL import Image

        decoded_verdicts = judge_clip([Image.fromarray(f) for f in decoded], clip.caption)
        assert [v.kept and v.moves_right for v in decoded_verdicts] == [True] * len(clip.objects)

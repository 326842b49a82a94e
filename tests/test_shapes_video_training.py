"""train-shapes-video at a tiny scale: the phases run, a resumed run continues where the first stopped, the export
loads with from_pretrained as a WanPipeline and generates a clip of the trained geometry."""

import json

import numpy as np
import pytest
import torch

from diffattn.shapes_video_training import (
    MAX_SEQUENCE_LENGTH,
    ShapesVideoTrainingConfig,
    clip_batch,
    encode_captions,
    train_shapes_video,
)


def _config(**changes):
    base = {"vae_steps": 2, "vae_frames": 5, "vae_batch_size": 1, "denoiser_steps": 2, "num_frames": 5,
            "batch_size": 1, "checkpoint_every": 1, "log_every": 1, "device": "cpu"}  # fmt: skip
    return ShapesVideoTrainingConfig(**{**base, **changes})


def test_phases_resume_and_export_a_loadable_wan_pipeline(tmp_path):
    from diffusers import DiffusionPipeline, WanPipeline

    out = tmp_path / "run"
    state = train_shapes_video(out, _config())
    assert (state["vae_step"], state["denoiser_step"], state["calibrated"]) == (2, 2, True)
    assert len(state["latents_std"]) == 8 and all(s > 0 for s in state["latents_std"])
    again = train_shapes_video(out, _config(denoiser_steps=3))  # resumes: one more denoiser step, no VAE step
    assert (again["vae_step"], again["denoiser_step"]) == (2, 3)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in log] == [("vae", 0), ("vae", 1), ("denoiser", 0), ("denoiser", 1),
                                                       ("denoiser", 2)]  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline", use_safetensors=True, torch_dtype=torch.float32)
    assert isinstance(pipe, WanPipeline) and pipe.vae.config.latents_std == again["latents_std"]
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}
    video = pipe("a red circle moving right", num_frames=5, height=64, width=64, num_inference_steps=2,
                 max_sequence_length=MAX_SEQUENCE_LENGTH, generator=torch.Generator().manual_seed(0),
                 output_type="np").frames[0]  # fmt: skip
    assert video.shape == (5, 64, 64, 3) and np.isfinite(video).all()
    assert json.loads((out / "pipeline" / "training_state.json").read_text())["denoiser_step"] == 3


def test_captions_are_encoded_as_the_pipeline_encodes_prompts():
    from diffattn.presets.shapes_video import build_shapes_wan

    pipe = build_shapes_wan()
    ours = encode_captions(pipe.tokenizer, pipe.text_encoder, ["a blue star moving up", ""], torch.device("cpu"))
    theirs, _ = pipe.encode_prompt(["a blue star moving up", ""], do_classifier_free_guidance=False,
                                   max_sequence_length=MAX_SEQUENCE_LENGTH)  # fmt: skip
    torch.testing.assert_close(ours, theirs)


def test_clip_batches_and_bad_configs():
    video, captions = clip_batch(0, 2, 9)
    assert video.shape == (2, 3, 9, 64, 64) and video.min() >= -1 and video.max() <= 1 and len(captions) == 2
    with pytest.raises(ValueError, match="num_frames=8 is not allowed: expected 4k \\+ 1 frames"):
        ShapesVideoTrainingConfig(num_frames=8)
    with pytest.raises(ValueError, match="lr=nan is not allowed"):
        ShapesVideoTrainingConfig(lr=float("nan"))


def test_the_command_trains_and_exports(tmp_path, capsys):
    from diffattn.cli import main

    out = tmp_path / "cli-run"
    argv = ["train-shapes-video", "--out", str(out), "--vae-steps", "1", "--denoiser-steps", "1", "--batch-size", "1",
            "--vae-batch-size", "1", "--device", "cpu"]  # fmt: skip
    # the command trains 33-frame clips; one step of each phase is enough to check it wires up
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"{out / 'pipeline'} (vae step 1, denoiser step 1)"
    assert (out / "pipeline" / "model_index.json").is_file()

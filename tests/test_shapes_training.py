"""The shapes-model training loop: two CPU steps from scratch, resuming from the checkpoint, a loadable export."""

import json

import torch
from diffusers import StableDiffusionPipeline

from diffattn.cli import main
from diffattn.shapes_training import ShapesTrainingConfig, scene_batch, train_shapes


def test_two_steps_fresh_then_resume_and_export(tmp_path):
    config = ShapesTrainingConfig(vae_steps=2, unet_steps=2, batch_size=2, checkpoint_every=1, device="cpu")
    state = train_shapes(tmp_path, config)
    assert (state["vae_step"], state["unet_step"]) == (2, 2)
    assert torch.isfinite(torch.tensor([state["vae_loss"], state["unet_loss"]])).all()
    first = (tmp_path / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["phase"] for line in first] == ["vae", "vae", "unet", "unet"]

    more = ShapesTrainingConfig(vae_steps=2, unet_steps=3, batch_size=2, checkpoint_every=1, device="cpu")
    state = train_shapes(tmp_path, more)  # resumes: the VAE is done, one more UNet step
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert state["unet_step"] == 3 and [(r["phase"], r["step"]) for r in log[4:]] == [("unet", 2)]

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", torch_dtype=torch.float32)
    assert pipe.unet.config.sample_size == 16
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_scene_stream_is_deterministic_and_cli(tmp_path, capsys):
    a_images, a_captions = scene_batch(100, 3)
    b_images, b_captions = scene_batch(100, 3)
    assert torch.equal(a_images, b_images) and a_captions == b_captions
    assert a_images.shape == (3, 3, 64, 64) and a_images.min() >= -1 and a_images.max() <= 1
    args = ["train-shapes", "--out", str(tmp_path), "--vae-steps", "1", "--unet-steps", "1", "--batch-size", "2",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    assert "unet step 1" in capsys.readouterr().out


def test_continue_from_an_exported_pipeline(tmp_path):
    config = ShapesTrainingConfig(vae_steps=1, unet_steps=1, batch_size=2, device="cpu")
    train_shapes(tmp_path / "first", config)
    exported = tmp_path / "first" / "pipeline"
    assert json.loads((exported / "training_state.json").read_text())["unet_step"] == 1
    more = ShapesTrainingConfig(vae_steps=1, unet_steps=2, batch_size=2, device="cpu")
    state = train_shapes(tmp_path / "second", more, init_from=exported)
    log = [json.loads(line) for line in (tmp_path / "second" / "train_log.jsonl").read_text().splitlines()]
    assert state["unet_step"] == 2 and [(r["phase"], r["step"]) for r in log] == [("unet", 1)]

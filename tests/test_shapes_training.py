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


def test_workers_see_the_same_stream_and_ema_is_exported(tmp_path):
    """Scenes rendered by worker processes give the same losses as in-process ones; the export holds the moving
    average 0.1 * initial + 0.9 * trained after one UNet step (warm-up weight 1 - min(decay, 1/10))."""
    from diffattn.shapes_training import build_components

    base = {"vae_steps": 1, "unet_steps": 1, "batch_size": 2, "device": "cpu", "log_every": 1}
    train_shapes(tmp_path / "inline", ShapesTrainingConfig(**base, num_workers=0))
    train_shapes(tmp_path / "workers", ShapesTrainingConfig(**base, num_workers=2))
    logs = [[json.loads(line)["loss"] for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
            for run in ("inline", "workers")]  # fmt: skip
    assert logs[0] == logs[1] and len(logs[0]) == 2

    initial = build_components(0)["unet"].state_dict()
    trained = torch.load(tmp_path / "inline" / "checkpoint.pt", weights_only=False)["models"]["unet"]
    exported = StableDiffusionPipeline.from_pretrained(tmp_path / "inline" / "pipeline").unet.state_dict()
    name = "conv_in.weight"
    assert not torch.equal(initial[name], trained[name])
    expected = 0.1 * initial[name] + 0.9 * trained[name]
    torch.testing.assert_close(exported[name].float(), expected, rtol=2e-3, atol=2e-4)


def test_time_budget_stops_and_exports(tmp_path):
    config = ShapesTrainingConfig(vae_steps=50, unet_steps=50, batch_size=2, device="cpu", max_minutes=0.0)
    state = train_shapes(tmp_path, config)
    assert state["vae_step"] == 0 and state["unet_step"] == 0  # the budget was spent before the first step
    assert (tmp_path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    resumed = train_shapes(tmp_path, ShapesTrainingConfig(vae_steps=1, unet_steps=1, batch_size=2, device="cpu"))
    assert (resumed["vae_step"], resumed["unet_step"]) == (1, 1)


def test_training_curve_keeps_the_last_record_of_a_repeated_step(tmp_path):
    """A resumed run logs the steps since its checkpoint again; the curve counts each step once (hand-computed)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from shapes_training_curve import windows

    records = [("vae", 0, 1.0), ("unet", 0, 0.4), ("unet", 1, 0.2), ("unet", 1, 0.3), ("unet", 2, 0.5)]
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"phase": p, "step": s, "loss": x}) + "\n" for p, s, x in records))
    assert windows(log, every=2) == [
        {"phase": "vae", "first_step": 0, "last_step": 0, "mean_loss": 1.0},
        {"phase": "unet", "first_step": 0, "last_step": 1, "mean_loss": 0.35},  # (0.4 + 0.3) / 2: step 1's last
        {"phase": "unet", "first_step": 2, "last_step": 2, "mean_loss": 0.5},
    ]
    # train-shapes-video logs its transformer phase as "denoiser"
    video = [("vae", 0, 1.0), ("denoiser", 0, 0.6), ("denoiser", 1, 0.2)]
    log.write_text("".join(json.dumps({"phase": p, "step": s, "loss": x}) + "\n" for p, s, x in video))
    assert [(w["phase"], w["mean_loss"]) for w in windows(log, every=2)] == [("vae", 1.0), ("denoiser", 0.4)]


def test_a_resumed_optimizer_keeps_the_learning_rate_it_is_given():
    """torch's Optimizer.load_state_dict restores the saved rate; a resumed run given --lr must train at that rate,
    with its moments resumed."""
    import torch

    from diffattn.shapes_training import load_optimizer

    weight = torch.nn.Parameter(torch.ones(3))
    first = torch.optim.AdamW([weight], lr=1e-3)
    weight.grad = torch.full((3,), 0.5)
    first.step()
    saved = first.state_dict()
    resumed = torch.optim.AdamW([weight], lr=2e-4)
    load_optimizer(resumed, saved)
    assert resumed.param_groups[0]["lr"] == 2e-4
    torch.testing.assert_close(resumed.state[weight]["exp_avg"], torch.full((3,), 0.05))  # (1 - 0.9) * 0.5


def test_the_loss_log_writes_each_flush_with_its_time_and_logs_the_rate(caplog):
    import io
    import logging

    import torch

    from diffattn.shapes_training import _LossLog

    file = io.StringIO()
    log = _LossLog(file, every=2)
    with caplog.at_level(logging.INFO, logger="diffattn.shapes_training"):
        log.add("denoiser", 7, torch.tensor(0.5))
        assert file.getvalue() == ""  # kept on the device until `every` steps
        log.add("denoiser", 8, torch.tensor(0.25))
    lines = [json.loads(line) for line in file.getvalue().splitlines()]
    assert [(r["phase"], r["step"], r["loss"]) for r in lines] == [("denoiser", 7, 0.5), ("denoiser", 8, 0.25)]
    assert lines[0]["seconds"] == lines[1]["seconds"] >= 0  # written by one flush
    assert "denoiser step 8: loss 0.3750 (mean of 2)" in caplog.text and "steps a second" in caplog.text

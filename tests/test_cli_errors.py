"""The command line: every error is one line, exit 2 for what the user gave (before any work where possible), exit 1
for valid work that failed; model folders that cannot be loaded safely give ModelLoadError; checkpoints and
pipeline folders never unpickle code."""

import json
import pickle
import time
from pathlib import Path

import pytest
import torch

import diffattn
from diffattn.cli import main
from diffattn.loading import ModelLoadError


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_out_naming_a_file_or_an_impossible_folder_is_refused_before_generating(tmp_path, capsys):
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"mine")
    start = time.monotonic()
    assert main(["generate", "-m", "tiny-sd", "-p", "x", "--steps", "1", "--out", str(existing)]) == 2
    assert "--out" in _one_line(capsys) and existing.read_bytes() == b"mine"
    assert main(["generate", "-m", "tiny-sd", "-p", "x", "--steps", "1", "--out", "/dev/null/x"]) == 2
    assert "cannot create the folder" in _one_line(capsys)
    assert time.monotonic() - start < 10  # refused before the pipeline ran


def test_a_device_this_machine_lacks_is_one_line_before_loading(tmp_path, capsys):
    for device, message in (
        ("cuda:99", "device='cuda:99' is not available"),
        ("gpu0", "device='gpu0' is not allowed"),
    ):
        assert main(["generate", "-m", "tiny-sd", "-p", "x", "--steps", "1", "--device", device,
                     "--out", str(tmp_path)]) == 2  # fmt: skip
        assert message in _one_line(capsys)
    assert not any(tmp_path.iterdir())
    job = tmp_path.parent / f"{tmp_path.name}-job.jsonl"
    job.write_text('{"prompt": "a red cat"}\n')
    assert main(["batch", str(job), "--out", str(tmp_path / "job"), "-m", "tiny-sd", "--device", "gpu0"]) == 2
    assert "device='gpu0' is not allowed" in _one_line(capsys)


class _Plant:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bin_only_folder(tmp_path: Path, marker: Path) -> Path:
    folder = tmp_path / "bin-model"
    pipe = diffattn.load_pipeline("tiny-sd")
    pipe.save_pretrained(folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    with open(folder / "unet" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Plant(marker)}, f)
    return folder


def test_model_folders_that_cannot_load_safely_give_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = _bin_only_folder(tmp_path, marker)
    with pytest.raises(ModelLoadError, match="has only pickled weights"):
        diffattn.load_pipeline(folder)
    assert main(["generate", "-m", str(folder), "-p", "x", "--out", str(tmp_path / "o")]) == 2
    assert "has only pickled weights (.bin/.pt); diffattn loads safetensors only" in _one_line(capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    assert main(["generate", "-m", str(broken), "-p", "x", "--out", str(tmp_path / "o")]) == 2
    assert "model_index.json is not valid JSON" in _one_line(capsys)
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", 3]}')
    assert main(["generate", "-m", str(broken), "-p", "x", "--out", str(tmp_path / "o")]) == 2
    assert "cannot load the pipeline folder" in _one_line(capsys)
    assert not marker.exists()


@pytest.mark.parametrize(
    "error, code, message",
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB"),
            1,
            "out of memory (asked for height=512",
        ),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 TB"), 1, "out of memory"),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR\nmore\nlines"), 1, "RuntimeError: cuDNN error"),
        (KeyError("something inside"), 1, "KeyError: 'something inside' (run with -v for the traceback)"),
    ],
)
def test_failures_of_valid_work_are_one_line_with_exit_1(tmp_path, capsys, monkeypatch, error, code, message):
    import diffattn.generation

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(diffattn.generation, "generate", fail)
    argv = ["generate", "-m", "tiny-sd", "-p", "x", "--height", "512", "--width", "512", "--out", str(tmp_path)]
    assert main(argv) == code
    err = _one_line(capsys)
    assert message in err
    if "out of memory" in message:
        assert "try a smaller --height/--width, fewer --num-frames" in err


def test_a_planted_training_checkpoint_is_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"state": {}, "models": {}, "optimizers": {}, "ema": None, "x": _Plant(marker)}, out / "checkpoint.pt")
    argv = ["train-shapes", "--out", str(out), "--vae-steps", "0", "--unet-steps", "0", "--device", "cpu"]
    assert main(argv) == 2
    assert "checkpoint.pt is not allowed: it holds objects other than tensors" in _one_line(capsys)
    assert not marker.exists()


def test_init_from_loads_safetensors_only(tmp_path):
    from diffattn.shapes_training import ShapesTrainingConfig, train_shapes

    marker = tmp_path / "pwned"
    folder = tmp_path / "export"
    for name in ("vae", "unet", "text_encoder"):
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps({}))
        with open(folder / name / "diffusion_pytorch_model.bin", "wb") as f:
            pickle.dump(_Plant(marker), f)
    (folder / "training_state.json").write_text(json.dumps({"vae_step": 1, "unet_step": 1}))
    config = ShapesTrainingConfig(vae_steps=0, unet_steps=0, device="cpu")
    with pytest.raises(Exception):
        train_shapes(tmp_path / "run", config, init_from=folder)
    assert not marker.exists()

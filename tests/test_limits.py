"""diffattn.Limits: the defaults admit the documented uses of the supported real models and refuse absurd requests,
before anything is loaded, through every face; the CLI and jobs can raise them."""

import json

import pytest

from diffattn.cli import main
from diffattn.generation import PIPELINES, generate
from diffattn.jobs import JobFileError, read_job
from diffattn.limits import Limits


DOCUMENTED = [  # (what, height, width, frames, steps)
    ("SDXL", 1024, 1024, None, 50),
    ("SD 1.5 UNet benchmark at 2048", 2048, 2048, None, 30),
    ("Wan 2.1 720p, 81 frames", 720, 1280, 81, 50),
    ("Wan 2.1 720p at 4x length", 720, 1280, 321, 50),
    ("HunyuanVideo 720p, 129 frames", 720, 1280, 129, 50),
    ("HunyuanVideo 720p at 4x length (radial's table)", 720, 1280, 509, 50),
    ("Wan 480p", 480, 832, 81, 50),
]
ABSURD = [  # (height, width, frames, steps, the limit named)
    (8192, 8192, None, 30, "max_side"),
    (100000, 100000, None, 30, "max_side"),
    (4096, 4096, None, 30, "max_pixels"),
    (512, 512, 10_001, 30, "max_frames"),
    (4096, 4096, 161, 30, "max_pixels"),
    (2048, 2048, 161, 30, "max_pixel_frames"),
    (512, 512, None, 10**6, "max_steps"),
]


@pytest.mark.parametrize("what, height, width, frames, steps", DOCUMENTED)
def test_defaults_admit_documented_uses(what, height, width, frames, steps):
    Limits().check(height=height, width=width, num_frames=frames, steps=steps)


@pytest.mark.parametrize("height, width, frames, steps, limit", ABSURD)
def test_defaults_refuse_absurd_requests_before_loading(height, width, frames, steps, limit):
    with pytest.raises(ValueError, match=f"the limit is {limit}="):
        Limits().check(height=height, width=width, num_frames=frames, steps=steps)
    loaded = len(PIPELINES.entries)
    with pytest.raises(ValueError, match=f"the limit is {limit}="):  # not ModelLoadError: checked before loading
        generate("tiny-wan", "a boat", height=height, width=width, num_frames=frames, steps=steps)
    assert len(PIPELINES.entries) == loaded


def test_the_command_line_refuses_and_can_raise_limits(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "o")
    assert main(["generate", "-m", "no-such-model", "-p", "x", "--height", "8192", "--width", "8192", "-o", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "height=8192 is not allowed: the limit is max_side=4096" in err
    # raised explicitly, the same request passes the limits and fails only on the missing model
    raised = ["--limits", "max_side=8192", "max_pixels=67108864"]
    assert main(["generate", "-m", "no-such-model", "-p", "x", "--height", "8192", "--width", "8192", "-o", out,
                 *raised]) == 2  # fmt: skip
    assert "cannot load 'no-such-model'" in capsys.readouterr().err
    monkeypatch.setenv("DIFFATTN_LIMITS", "max_steps=2000000")
    assert main(["generate", "-m", "no-such-model", "-p", "x", "--steps", "1000000", "-o", out]) == 2
    assert "cannot load 'no-such-model'" in capsys.readouterr().err
    assert main(["generate", "-m", "tiny-sd", "-p", "x", "--limits", "max_speed=3", "-o", out]) == 2
    assert "limits: 'max_speed=3' is not allowed: expected NAME=INT" in capsys.readouterr().err


def test_job_files_are_checked_against_limits_before_running(tmp_path, monkeypatch):
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "a boat", "model": "tiny-wan", "num_frames": 100000}) + "\n")
    with pytest.raises(JobFileError, match="job.jsonl line 1: num_frames=100000 is not allowed: the limit is max_fr"):
        read_job(job)
    assert read_job(job, limits=Limits(max_frames=100000, max_pixel_frames=10**12))
    monkeypatch.setenv("DIFFATTN_LIMITS", "max_frames=100000,max_pixel_frames=1000000000000")
    assert read_job(job)


def test_preset_defaults_count_against_limits():
    with pytest.raises(ValueError, match="the limit is max_frames=4"):  # tiny-wan's own 9 frames
        generate("tiny-wan", "a boat", limits=Limits(max_frames=4))


def test_limits_parse_and_refuse_bad_values():
    assert Limits.parse("max_steps=5, max_frames=7") == Limits(max_steps=5, max_frames=7)
    for text, message in [("max_steps=0", "max_steps=0 is not allowed"), ("max_steps=x", "max_steps='x'"),
                          ("steps=3", "'steps=3' is not allowed")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            Limits.parse(text)

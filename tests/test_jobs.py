import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from diffattn.cli import main
from diffattn.jobs import JobDefaults, JobFileError, batches, read_job, read_manifests, run_job, shard
from diffattn.loading import load_pipeline
from diffattn.methods.agent_attention import AgentAttentionConfig
from diffattn.methods.ir_diffusion import IRDiffusionConfig
from diffattn.presets import PRESETS
from diffattn.request import GenerationRequest

from helpers import torchrun


def write_job(tmp_path, lines, name="job.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_read_job_expands_seeds_and_applies_defaults(tmp_path):
    path = write_job(
        tmp_path,
        [
            {"prompt": "a red circle", "name": "circle"},
            "# comment",
            "",
            {"prompt": "a blue square", "seeds": [4, 7], "steps": 2, "model": "tiny-sd", "tome": {"ratio": 0.3}},
            {"prompt": "a cat", "seed": 9, "agent": True, "maps": True},
            {
                "prompt": "a cat and a dog",
                "subjects": ["a cat", "a dog"],
                "ir": {"mask_dropout": 0.2},
                "ir_masks": "attention",
            },
        ],
    )
    units = read_job(path, JobDefaults(model="shapes-sd", steps=5, seeds=(0, 1)))
    assert [u.name for u in units][:5] == ["circle-seed0", "circle-seed1", "00004-seed4", "00004-seed7", "00005-seed9"]
    assert [u.seed for u in units][:5] == [0, 1, 4, 7, 9]
    assert [u.model for u in units][:5] == ["shapes-sd", "shapes-sd", "tiny-sd", "tiny-sd", "shapes-sd"]
    ir = units[-1].request
    assert ir.subjects == ("a cat", "a dog") and ir.masks == "attention"
    assert ir.ir == IRDiffusionConfig(mask_dropout=0.2)
    assert units[0].request == GenerationRequest("shapes-sd", "a red circle", seed=0, steps=5, attention_maps=False)
    assert units[2].request.steps == 2
    assert units[2].request.agent == AgentAttentionConfig(agent_ratio=None, stride=2, ratio=0.3)
    assert units[4].request.agent == AgentAttentionConfig() and units[4].request.attention_maps is True


def test_plain_text_job_is_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n# skipped\na blue square  \n")
    units = read_job(path)
    assert [(u.name, u.prompt, u.seed) for u in units] == [
        ("00001-seed0", "a red circle", 0),
        ("00004-seed0", "a blue square", 0),
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "x", "colour": 1}, "job.jsonl line 1: unknown key 'colour'; allowed: prompt"),
        ({"prompt": ""}, "prompt='' is not allowed"),
        ({"name": "x"}, "prompt='' is not allowed"),
        ({"prompt": "x", "steps": "4"}, "steps='4' is not allowed: expected an int >= 1"),
        ({"prompt": "x", "steps": 0}, "steps=0 is not allowed: expected an int >= 1"),
        ({"prompt": "x", "seeds": [1, 1]}, "seeds=[1, 1] is not allowed: expected distinct seeds"),
        ({"prompt": "x", "seeds": []}, "seeds=[] is not allowed"),
        ({"prompt": "x", "seed": 1, "seeds": [2]}, "give seed or seeds, not both"),
        ({"prompt": "x", "name": "../up"}, "name='../up' is not allowed"),
        ({"prompt": "x", "agent": {"ratio": 2}}, "job.jsonl line 1: agent: ratio=2 is not allowed"),
        (
            {"prompt": "x", "radial": {"decay": 1}},
            "job.jsonl line 1: radial: unknown field 'decay' of RadialAttentionConfig; allowed: dense_layers, ",
        ),
        (
            {"prompt": "x", "structured": {"x": 1}},
            "structured: unknown field 'x' of StructuredGuidanceConfig; allowed:",
        ),
        ({"prompt": "x", "tome": {"stride": 4}}, "tome takes only 'ratio'"),
        ({"prompt": "x", "agent": True, "tome": True}, "agent and tome are alternatives"),
        ({"prompt": "x", "astar": "iou"}, "astar='iou' is not allowed"),
        ({"prompt": "x", "guidance_interval": [0.5]}, "guidance_interval=[0.5] is not allowed"),
        ({"prompt": "x", "ir": True}, "ir and masks are IR-Diffusion settings: they need subjects"),
        ({"prompt": "x", "subjects": "a cat"}, "subjects='a cat' is not allowed"),
        ({"prompt": "x", "subjects": ["x"], "ir": {"seed": "1"}}, "ir: seed='1' is not allowed"),
        ("{not json", "job.jsonl line 1: not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
    ],
)
def test_bad_job_lines_name_the_line_and_the_key(tmp_path, line, message):
    with pytest.raises(JobFileError) as info:
        read_job(write_job(tmp_path, [line]))
    assert message in str(info.value)


def test_duplicate_output_names_are_refused(tmp_path):
    path = write_job(tmp_path, [{"prompt": "a", "name": "same"}, {"prompt": "b", "name": "same"}])
    with pytest.raises(JobFileError, match="output name 'same-seed0' is already used by line 1"):
        read_job(path)


def test_shard_covers_every_unit_once():
    units = list(range(11))
    shards = [shard(units, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == units and shards[1] == [1, 4, 7, 10]
    with pytest.raises(ValueError, match="process_index=3 is not in"):
        shard(units, 3, 3)


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_run_job_outputs_match_the_plain_pipeline_and_resume_without_overwriting(tmp_path):
    job = write_job(tmp_path, [{"prompt": "a red cat", "seeds": [3, 5]}, {"prompt": "a green dog", "name": "dog"}])
    units = read_job(job, JobDefaults(model="tiny-sd", steps=2))
    out = tmp_path / "out"
    report = run_job(units, out, process_index=0, num_processes=1)
    assert report.generated == ["00001-seed3", "00001-seed5", "dog-seed0"] and not report.skipped
    # Independent reference: diffusers' own pipeline call with the same seed and the preset's call arguments.
    pipe = load_pipeline("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    for name, prompt, seed in [("00001-seed3", "a red cat", 3), ("dog-seed0", "a green dog", 0)]:
        expected = pipe(
            prompt,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(seed),
            **PRESETS["tiny-sd"].call_defaults,
        ).images[0]
        np.testing.assert_array_equal(_png(out / f"{name}.png"), np.asarray(expected))
    records = read_manifests(out)
    assert set(records) == {"00001-seed3", "00001-seed5", "dog-seed0"}
    assert records["dog-seed0"]["files"] == ["dog-seed0.png"] and records["dog-seed0"]["spec"]["seed"] == 0
    assert {(r["device"], r["dtype"]) for r in records.values()} == {("cpu", "float32")}  # where the pixels came from
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}

    again = run_job(units, out, process_index=0, num_processes=1)  # a rerun finds everything done
    assert again.skipped == [u.name for u in units] and not again.generated
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before

    # A file no record names sits where an output goes (put there by hand): it is never overwritten, the unit
    # fails saying so, and runs once the file is moved away.
    manifest = out / "manifest-rank0.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:2]))
    third = run_job(units, out, process_index=0, num_processes=1)
    assert third.failed == ["dog-seed0"] and not third.generated
    assert (out / "dog-seed0.png").read_bytes() == before["dog-seed0.png"]
    assert "dog-seed0.png already exists and no manifest record names it" in (out / "failures-rank0.jsonl").read_text()
    (out / "dog-seed0.png").rename(tmp_path / "moved.png")
    fourth = run_job(units, out, process_index=0, num_processes=1)
    assert fourth.generated == ["dog-seed0"] and read_manifests(out)["dog-seed0"]["files"] == ["dog-seed0.png"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_run_job_refuses_a_folder_holding_other_settings(tmp_path):
    out = tmp_path / "out"
    run_job(
        read_job(write_job(tmp_path, ["a red cat"], "a.txt"), JobDefaults("tiny-sd", 1)),
        out,
        process_index=0,
        num_processes=1,
    )
    changed = read_job(write_job(tmp_path, ["a red cat"], "a.txt"), JobDefaults("tiny-sd", 2))
    with pytest.raises(JobFileError, match="already holds '00001-seed0' made with other settings"):
        run_job(changed, out, process_index=0, num_processes=1)


def test_processes_split_the_job_and_a_failed_unit_does_not_stop_it(tmp_path, capsys):
    lines = [{"prompt": f"a cat {i}", "model": "tiny-sd", "steps": 1} for i in range(3)]
    lines.insert(1, {"prompt": "a dog", "model": str(tmp_path / "no-such-model"), "name": "broken"})
    units = read_job(write_job(tmp_path, lines))
    out = tmp_path / "out"
    reports = [run_job(units, out, process_index=r, num_processes=2) for r in range(2)]
    assert reports[0].generated == ["00001-seed0", "00003-seed0"]
    assert reports[1].generated == ["00004-seed0"] and reports[1].failed == ["broken-seed0"]
    failure = json.loads((out / "failures-rank1.jsonl").read_text())
    assert failure["name"] == "broken-seed0" and "no-such-model" in failure["error"]
    assert set(read_manifests(out)) == {"00001-seed0", "00003-seed0", "00004-seed0"}


def test_batch_command_under_torchrun_with_two_processes(tmp_path):
    job = write_job(tmp_path, [{"prompt": f"a cat {i}", "name": f"cat{i}"} for i in range(3)])
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [*torchrun(2), "-m", "diffattn", "batch",
               str(job), "--out", str(out), "--model", "tiny-sd", "--steps", "1"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{out}: 3 of 3 outputs done (2 now)" in proc.stdout  # process 0 made 2 of the 3
    processes = {r["name"]: r["process"] for r in read_manifests(out).values()}
    assert processes == {"cat0-seed0": 0, "cat1-seed0": 1, "cat2-seed0": 0}
    # Same images as one process makes (up to PNG rounding of thread-count-dependent float sums).
    single = tmp_path / "single"
    assert main(["batch", str(job), "--out", str(single), "--model", "tiny-sd", "--steps", "1"]) == 0
    for name in processes:
        a, b = _png(out / f"{name}.png").astype(int), _png(single / f"{name}.png").astype(int)
        assert np.abs(a - b).max() <= 1


def test_batch_command_reports_missing_outputs_and_exits_1(tmp_path, capsys):
    job = write_job(tmp_path, [{"prompt": "a dog", "model": str(tmp_path / "nothing")}])
    assert main(["batch", str(job), "--out", str(tmp_path / "out")]) == 1
    assert "1 not done" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_batches_group_consecutive_units_with_the_same_settings(tmp_path):
    lines = [
        {"prompt": "a", "seeds": [0, 1, 2]},
        {"prompt": "b"},
        {"prompt": "c", "steps": 3},
        {"prompt": "d", "astar": True},
        {"prompt": "e"},
    ]
    units = read_job(write_job(tmp_path, lines), JobDefaults("tiny-sd", 2))
    groups = [[u.name for u in g] for g in batches(units, 2)]
    assert groups == [
        ["00001-seed0", "00001-seed1"],
        ["00001-seed2", "00002-seed0"],
        ["00003-seed0"],  # other steps
        ["00004-seed0"],  # A-STAR runs one prompt per call
        ["00005-seed0"],
    ]
    assert [len(g) for g in batches(units, 1)] == [1] * 7


def test_batched_calls_keep_each_seeds_image(tmp_path):
    job = write_job(tmp_path, [{"prompt": "a red cat", "seeds": [3, 5]}, {"prompt": "a green dog", "name": "dog"}])
    units = read_job(job, JobDefaults(model="tiny-sd", steps=2))
    out = tmp_path / "out"
    report = run_job(units, out, process_index=0, num_processes=1, batch_size=3)
    assert report.generated == ["00001-seed3", "00001-seed5", "dog-seed0"]
    assert {r["batch"] for r in read_manifests(out).values()} == {3}
    pipe = load_pipeline("tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    for name, prompt, seed in [("00001-seed5", "a red cat", 5), ("dog-seed0", "a green dog", 0)]:
        alone = pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                     **PRESETS["tiny-sd"].call_defaults).images[0]  # fmt: skip
        diff = np.abs(_png(out / f"{name}.png").astype(int) - np.asarray(alone).astype(int))
        assert diff.max() <= 2  # the same noise; batched matmuls round differently


def test_generate_batch_refuses_what_takes_one_prompt():
    from diffattn.generation import generate_batch

    with pytest.raises(ValueError, match="requests that differ only in prompt and seed"):
        generate_batch([GenerationRequest("tiny-sd", "a"), GenerationRequest("tiny-sd", "b", steps=3)])
    with pytest.raises(TypeError, match="takes GenerationRequests"):
        generate_batch(["a", "b"])
    with pytest.raises(
        ValueError, match="A-STAR, IR-Diffusion \\(subjects\\) and structured guidance take one prompt"
    ):
        generate_batch([GenerationRequest("tiny-sd", p, seed=i, astar="astar") for i, p in enumerate(["a", "b"])])


def test_batched_calls_save_each_images_attention_maps(tmp_path, capsys):
    job = write_job(tmp_path, ["a red cat", "a blue dog"], "prompts.txt")
    out = tmp_path / "out"
    args = ["batch", str(job), "--out", str(out), "-m", "tiny-sd", "--steps", "1", "--maps", "--batch-size", "2"]
    assert main(args) == 0
    records = read_manifests(out)
    assert {r["batch"] for r in records.values()} == {2}
    for name in ("00001-seed0", "00002-seed0"):
        assert records[name]["files"] == [f"{name}.png", f"{name}-attention.png"]
    # each grid shows its own prompt's tokens: the two differ
    assert not np.array_equal(_png(out / "00001-seed0-attention.png"), _png(out / "00002-seed0-attention.png"))


def test_a_batch_output_is_reproduced_bit_for_bit_from_its_manifest_record(tmp_path, capsys):
    job = write_job(tmp_path, [{"prompt": "a red cat", "name": "cat", "seed": 7, "steps": 2, "tome": {"ratio": 0.3}}])
    out = tmp_path / "out"
    assert main(["batch", str(job), "--out", str(out), "-m", "tiny-sd"]) == 0
    record_line = (out / "manifest-rank0.jsonl").read_text().splitlines()[0]
    record = tmp_path / "record.json"
    record.write_text(record_line)
    capsys.readouterr()
    again = tmp_path / "again"
    assert main(["generate", "--request", str(record), "--out", str(again)]) == 0
    written = capsys.readouterr().out.split()
    assert written[0].endswith("tiny-sd-seed7-tome.png")
    assert (out / "cat-seed7.png").read_bytes() == open(written[0], "rb").read()
    request_only = tmp_path / "request.json"
    request_only.write_text(json.dumps(json.loads(record_line)["request"]))
    assert main(["generate", "--request", str(request_only), "--out", str(again)]) == 0
    assert main(["generate", "--request", str(record), "--steps", "3", "--out", str(again)]) == 2
    assert "--request holds the whole request; it does not combine with --steps" in capsys.readouterr().err


def test_a_video_unit_is_written_as_mp4_through_the_transaction(tmp_path):
    import imageio.v3 as iio

    job = write_job(tmp_path, [{"prompt": "a boat", "model": "tiny-wan", "steps": 1, "name": "boat"}])
    out = tmp_path / "out"
    run_job(read_job(job), out, process_index=0, num_processes=1)
    assert read_manifests(out)["boat-seed0"]["files"] == ["boat-seed0.mp4"]
    assert iio.imread(out / "boat-seed0.mp4").shape[0] == 9  # the preset's 9 frames
    assert sorted(p.name for p in out.iterdir()) == ["boat-seed0.mp4", "manifest-rank0.jsonl"]


def test_a_job_lines_radial_fields_go_over_the_models_radial_settings(tmp_path):
    from diffattn.methods.radial_attention import RadialAttentionConfig

    job = tmp_path / "job.jsonl"
    job.write_text(
        '{"model": "shapes-wan", "prompt": "a red circle moving right", "radial": true}\n'
        '{"model": "shapes-wan", "prompt": "a red circle moving right", "radial": {"decay_factor": 0.5}}\n'
        '{"model": "tiny-wan", "prompt": "a boat", "radial": true}\n'
    )
    units = read_job(job)
    preset = PRESETS["shapes-wan"].radial
    assert units[0].request.radial == preset
    assert units[1].request.radial == RadialAttentionConfig(**{**vars(preset), "decay_factor": 0.5})
    assert units[2].request.radial == RadialAttentionConfig()


def test_a_radial_outputs_record_holds_its_mask_density_and_its_mask_picture(tmp_path):
    """A radial output's manifest record says the density its sparse steps ran at (the mask as the method builds it
    for tiny-wan's 33 frames: 9 latent frames of 64 tokens), and its mask picture is saved beside it; a radial run
    that stayed dense has no density but the note that says so."""
    from diffattn.methods.radial_mask import radial_block_mask

    job = tmp_path / "job.jsonl"
    radial = {"block_size": 16, "dense_timesteps": 0, "dense_layers": 0}
    job.write_text(
        json.dumps({"prompt": "a boat", "name": "sparse", "num_frames": 33, "radial": radial})
        + "\n"
        + json.dumps(
            {"prompt": "a boat", "name": "dense", "num_frames": 33, "radial": {**radial, "dense_timesteps": 2}}
        )
        + "\n"
        + json.dumps({"prompt": "a boat", "name": "plain", "num_frames": 33})
        + "\n"
    )
    out = tmp_path / "out"
    defaults = JobDefaults(model="tiny-wan", steps=2)
    run_job(read_job(job, defaults), out, process_index=0, num_processes=1)
    records = {r["name"]: r for r in read_manifests(out).values()}
    expected = float(radial_block_mask(9, 64, block_size=16, decay_factor=1.0, sink_frames=1).float().mean())
    assert records["sparse-seed0"]["radial_density"] == pytest.approx(expected, abs=1e-6) and expected < 1
    assert "notes" not in records["sparse-seed0"]
    assert (
        "radial_density" not in records["dense-seed0"] and "ran no step sparse" in records["dense-seed0"]["notes"][0]
    )
    assert "radial_density" not in records["plain-seed0"]
    assert any(p.name.endswith("-mask.png") and "sparse" in p.name for p in out.rglob("*.png"))

import json
import subprocess
import sys

import pytest
from PIL import Image

from diffattn.cli import main
from diffattn.presets import PRESETS


def test_generate_writes_outputs_and_never_overwrites(tmp_path, capsys):
    args = [
        "generate",
        "--model",
        "tiny-sd",
        "--prompt",
        "a red cat",
        "--steps",
        "2",
        "--seed",
        "3",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    first = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in first] == ["tiny-sd-seed3.png", "tiny-sd-seed3-attention.png"]
    assert Image.open(first[0]).size == (128, 128)
    before = (tmp_path / "tiny-sd-seed3.png").read_bytes()
    assert main(args) == 0
    second = capsys.readouterr().out.split()
    assert second[0].endswith("tiny-sd-seed3-1.png")
    assert (tmp_path / "tiny-sd-seed3.png").read_bytes() == before  # the first output is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_generate_video_as_mp4(tmp_path, capsys):
    assert main(["generate", "-m", "tiny-wan", "-p", "a boat", "--steps", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.split()
    assert len(out) == 1 and out[0].endswith("tiny-wan-seed0.mp4")
    import imageio.v3 as iio

    frames = iio.imread(out[0])
    assert frames.shape[0] == 9 and frames.shape[1:3] == (128, 128)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "x", "--steps", "0"], "steps=0 is not allowed: expected an int >= 1"),
        (
            ["generate", "--prompt", "x", "--seed", "-1"],
            "argument --seed: seed=-1 is not allowed: expected an int seed",
        ),
        (["generate", "--steps", "2"], "--prompt is required (or --request with a recorded request)"),
        (["generate", "--prompt", "x", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (["generate", "--prompt", "  ", "--steps", "1"], "prompt='  ' is not allowed: expected a non-empty string"),
        (["generate", "--prompt", "x", "--model", "nobody/nothing"], "cannot load 'nobody/nothing'"),
        (["demo", "--presets", "tiny-x"], "argument --presets: invalid choice: 'tiny-x'"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
        (
            ["generate", "-p", "x", "-m", "tiny-wan", "--decay-factor", "0.5"],
            "radial options ['decay_factor'] need --radial",
        ),
        (
            ["generate", "-m", "shapes-sd", "-p", "x", "--radial"],
            "radial attention is for video models; 'shapes-sd' is an image model",
        ),
        (
            ["generate", "-p", "x", "-m", "tiny-wan", "--radial", "--decay-factor", "-1"],
            "decay_factor=-1.0 is not allowed",
        ),
        (["generate", "-p", "x", "--radial", "--block-size", "48"], "argument --block-size: invalid choice: 48"),
        (["generate", "-p", "x", "--agent", "--tome"], "--agent and --tome are alternatives"),
        (["generate", "-p", "x", "--conjunction"], "--conjunction and --phrase need --structured"),
        (["generate", "-p", "a cat", "-m", "tiny-wan", "--astar"], "A-STAR runs on Stable Diffusion 1.x/2.x/XL"),
        (["generate", "-p", "a cat", "--astar", "iou"], "argument --astar: invalid choice: 'iou'"),
        (["generate", "-p", "a cat", "--structured", "--phrase", "a dog"], "phrase='a dog' does not occur"),
        (["generate", "-p", "x", "--merge-ratio", "0.3"], "--merge-ratio needs --agent or --tome"),
        (["generate", "-p", "x", "--tome", "--merge-ratio", "2"], "ratio=2.0 is not allowed"),
        (["generate", "-p", "x", "-m", "tiny-wan", "--agent"], "agent attention is for Stable Diffusion UNets"),
        (["generate", "-p", "x", "--ir-masks", "attention"], "--ir-masks and --mask-dropout need --subject"),
        (
            ["generate", "-p", "a cat", "--subject", "a cat", "--agent"],
            "(IR-Diffusion) runs its own pipeline and does not combine with agent",
        ),
        (["generate", "-p", "a cat", "--subject", "a cat", "--mask-dropout", "2"], "mask_dropout=2.0 is not allowed"),
        (
            ["generate", "-p", "a cat", "-m", "tiny-sd", "--subject", "a cat", "--ir-masks", "segmenter"],
            "masks='segmenter': no segmenter for 'tiny-sd'",
        ),
        (
            ["generate", "-p", "a boat", "-m", "tiny-wan", "--subject", "a boat"],
            "IR-Diffusion runs on Stable Diffusion",
        ),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_generate_with_radial_attention_saves_video_and_mask(tmp_path, capsys):
    args = ["generate", "-m", "tiny-wan", "-p", "a boat", "--steps", "2", "--num-frames", "33", "--radial",
            "--block-size", "64", "--dense-timesteps", "1", "--dense-layers", "0", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in out] == ["tiny-wan-seed0-radial.mp4", "tiny-wan-seed0-radial-mask.png"]
    mask = Image.open(out[1])
    assert mask.size[0] == mask.size[1] >= 9  # 9 x 9 blocks of 64 for 9 latent frames of 64 tokens


@pytest.mark.parametrize("flag", ["--agent", "--tome", "--structured", "--astar"])
def test_generate_with_token_merging(tmp_path, capsys, flag):
    args = [
        "generate",
        "-m",
        "tiny-sd",
        "-p",
        "a red cat",
        "--steps",
        "2",
        "--height",
        "256",
        "--width",
        "256",
        flag,
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out.split()
    assert out[0].endswith(f"tiny-sd-seed0-{flag.lstrip('-')}.png")
    assert Image.open(out[0]).size == (256, 256)


def test_generate_with_subjects_saves_scene_references_and_grid(tmp_path, capsys):
    args = ["generate", "-p", "a red circle and a blue square", "--subject", "a red circle", "--subject",
            "a blue square", "--steps", "2", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    out = [p.rsplit("/", 1)[-1] for p in capsys.readouterr().out.split()]
    assert out == ["shapes-sd-seed0-ir.png", "shapes-sd-seed0-ir-ref1.png", "shapes-sd-seed0-ir-ref2.png",
                   "shapes-sd-seed0-ir-subjects.png"]  # fmt: skip
    assert Image.open(tmp_path / out[0]).size == (64, 64)


def test_fps_sets_the_videos_rate_and_is_refused_for_an_image_model(tmp_path, capsys):
    import imageio.v3 as iio

    assert (
        main(["generate", "-m", "tiny-wan", "-p", "a boat", "--steps", "1", "--fps", "4", "--out", str(tmp_path)]) == 0
    )
    video = tmp_path / capsys.readouterr().out.split()[0]
    assert video.suffix == ".mp4" and iio.immeta(video)["fps"] == 4.0
    assert (
        main(["generate", "-m", "tiny-sd", "-p", "a cat", "--steps", "1", "--fps", "4", "--out", str(tmp_path / "i")])
        == 2
    )
    assert "--fps 4 is for video models; 'tiny-sd' is an image model" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()  # refused before any work


def test_help_everywhere(capsys):
    proc = subprocess.run([sys.executable, "-m", "diffattn.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: diffattn" in proc.stdout  # the module runs as a program
    assert all(
        f"    {c}" in proc.stdout for c in ("generate", "batch", "demo", "train-lora", "train-shapes", "presets")
    )
    for command in ("generate", "batch", "demo", "presets", "train-lora", "train-shapes", "train-shapes-video"):
        assert main([command, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: diffattn {command}")


def test_generate_help_states_the_defaults_a_run_takes(capsys, monkeypatch):
    """--help's defaults are the ones a run takes: the library's radial settings and each preset's own, the presets'
    step counts, the method configs' ratios (a hand-written '(default 1.0)' once hid shapes-wan's 0.25)."""
    import re

    from diffattn.cli import build_parser, radial_config_from_args
    from diffattn.generation import default_steps
    from diffattn.methods.agent_attention import AgentAttentionConfig
    from diffattn.methods.radial_attention import RadialAttentionConfig

    monkeypatch.setenv("COLUMNS", "2000")  # argparse wraps at hyphens ("shapes-" / "sd") otherwise
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())  # past the usage

    def flag_help(flag):
        return re.search(rf"{flag} \S+ (.*?)(?= --[a-z]|$)", text).group(1)

    library = RadialAttentionConfig()
    for flag, field in (("--decay-factor", "decay_factor"), ("--dense-timesteps", "dense_timesteps"),
                        ("--dense-layers", "dense_layers"), ("--block-size", "block_size")):  # fmt: skip
        args = build_parser().parse_args(["generate", "-p", "x", "--radial"])
        taken = getattr(radial_config_from_args(args, "shapes-wan"), field)
        assert taken == getattr(PRESETS["shapes-wan"].radial, field)
        assert f"shapes-wan {taken}" in flag_help(flag) and f"(default {getattr(library, field)};" in flag_help(flag)
    steps = flag_help("--steps")
    for name in PRESETS:
        group = re.search(rf"(\d+) for [^;]*\b{re.escape(name)}\b", steps)
        assert group is not None and int(group.group(1)) == default_steps(name), name
    agent, tome = AgentAttentionConfig().ratio, AgentAttentionConfig.tome().ratio
    assert f"tokens merged (default: {agent:g} with --agent, {tome:g} with --tome)" in text


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("tiny-sd", "tiny-sdxl", "tiny-wan", "tiny-hunyuan-video"))


def test_demo_writes_report_with_every_preset(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    index = tmp_path / "index.html"
    assert capsys.readouterr().out.strip() == str(index)
    html = index.read_text()
    runs = list(tmp_path.glob("run-*"))
    assert len(runs) == 1
    report = json.loads((runs[0] / "report.json").read_text())
    assert [r["preset"] for r in report["results"]] == list(PRESETS)
    for row in report["results"]:
        assert row["generate_seconds"] > 0
        for f in row["files"]:
            assert (tmp_path / f).is_file() and f in html
    assert any(f.endswith("-attention.png") for r in report["results"] for f in r["files"])
    assert any(f.endswith(".mp4") for r in report["results"] for f in r["files"])
    radial_rows = {r["preset"]: r for r in report["radial"]}
    assert set(radial_rows) == {n for n, p in PRESETS.items() if p.kind == "video"}
    for row in radial_rows.values():
        assert 0 < row["density"] < 1 and row["dense_seconds"] > 0 and row["radial_seconds"] > 0
        assert any(f.endswith("-mask.png") for f in row["radial_files"])
        assert all((tmp_path / f).is_file() and f in html for f in row["dense_files"] + row["radial_files"])
    agent_rows = {r["preset"]: r for r in report["agent"]}
    assert set(agent_rows) == {"tiny-sd", "tiny-sdxl"}
    for row in agent_rows.values():
        assert row["dense_seconds"] > 0 and row["agent_seconds"] > 0
        assert all((tmp_path / f).is_file() and f in html for f in row["dense_files"] + row["agent_files"])
    editing = {r["method"]: r for r in report["editing"]}
    assert set(editing) == {"plain", "structured", "a-star"}
    for row in editing.values():  # the trained preset, a few seeds each, every image scored by the judge
        assert [cell["seed"] for cell in row["images"]] == [0, 1, 2, 3]
        for cell in row["images"]:
            assert cell["binding"] in (0.0, 0.5, 1.0) and cell["seconds"] > 0
            assert all((tmp_path / f).is_file() and f in html for f in cell["files"])
            assert Image.open(tmp_path / cell["files"][0]).size == (64, 64)
    subjects = report["subjects"]
    assert [row["seed"] for row in subjects["images"]] == [0, 1, 2, 3]
    for row in subjects["images"]:
        assert row["kept_plain"] in (0.0, 0.5, 1.0) and row["kept_ir"] in (0.0, 0.5, 1.0)
        assert (tmp_path / row["grid"]).is_file() and row["grid"] in html
    for method in ("plain", "a-star"):  # heatmaps before and after editing
        assert all(any(f.endswith("-attention.png") for f in cell["files"]) for cell in editing[method]["images"])
    assert main(["demo", "--out", str(tmp_path), "--steps", "1", "--presets", "tiny-sd"]) == 0
    assert len(list(tmp_path.glob("run-*"))) == 2  # an earlier run is kept


def test_video_requests_default_to_the_trained_video_model_and_its_radial_settings():
    from diffattn.cli import build_parser, request_from_args
    from diffattn.methods.radial_attention import RadialAttentionConfig
    from diffattn.presets import DEFAULT_PRESET, DEFAULT_VIDEO_PRESET

    def request(*argv):
        return request_from_args(build_parser().parse_args(["generate", "-p", "a red circle moving right", *argv]))

    assert request().model == DEFAULT_PRESET == "shapes-sd"
    assert request("--num-frames", "33").model == DEFAULT_VIDEO_PRESET == "shapes-wan"
    radial = request("--radial").radial
    assert request("--radial").model == "shapes-wan" and radial == PRESETS["shapes-wan"].radial
    assert radial.block_size == 16  # 256-token frames: the library's 128-token blocks would be two a frame
    # flags go over the model's settings; another model gets the library's
    assert request("--radial", "--decay-factor", "0.5").radial == RadialAttentionConfig(
        **{**vars(PRESETS["shapes-wan"].radial), "decay_factor": 0.5}
    )
    assert request("-m", "tiny-wan", "--radial").radial == RadialAttentionConfig()


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "-m", "tiny-sd", "-p", "a red cat", "--steps", "1", "--out", "{tmp}/out"],
        ["train-lora", "--data", "{tmp}", "--out", "{tmp}/lora", "--steps", "1"],
        ["train-shapes-video", "--out", "{tmp}/run", "--max-minutes", "0.1"],
        ["demo", "--out", "{tmp}/demo"],
    ],
)
def test_one_process_commands_refuse_a_many_process_launch(argv, tmp_path, monkeypatch, capsys):
    """Under `torchrun --nproc-per-node 2` every process would do the same job and write the same outputs."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"diffattn {argv[0]}: error: diffattn {argv[0]} runs in one process, but this launch started 2" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_one_process_launch_generates(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")  # what `accelerate launch` / `torchrun --nproc-per-node 1` set
    assert main(["generate", "-m", "tiny-sd", "-p", "a red cat", "--steps", "1", "--out", str(tmp_path)]) == 0
    written = [p.name for p in tmp_path.iterdir()]
    assert "tiny-sd-seed0.png" in written and all(name.endswith(".png") for name in written)

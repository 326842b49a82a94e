import importlib.util
import os
import sys
from pathlib import Path

import pytest


pytest.importorskip("gradio")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _load_app():
    spec = importlib.util.spec_from_file_location("diffattn_app", Path(__file__).parent.parent / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_handler_generates_image_and_maps():
    app = _load_app()
    image, video, grid, mask, subjects, info = app.run_generation("tiny-sd", "a red cat", "", 2, 1, 7.5, 128, 128, 9)
    assert image.size == (128, 128) and video is None and grid is not None and mask is None and subjects is None
    assert "tiny-sd" in info and "note:" not in info
    assert "sampler EulerDiscreteScheduler · cpu (float32)" in info  # the pipeline's own scheduler, device and dtype
    # 120 words and CLIP's start and end tokens: it keeps the start token, 75 words and the end token
    long = " ".join(["a red cat"] * 40)
    *_, info = app.run_generation("tiny-sd", long, "", 1, 1, 7.5, 128, 128, 9)
    lost = " ".join(["a red cat"] * 15)
    assert f"**note:** the prompt is 122 tokens and 'tiny-sd' reads 77: the end, '{lost}', was not seen" in info
    merged, *_ = app.run_generation("tiny-sd", "a red cat", "", 2, 1, 7.5, 256, 256, 9, False, 1.0, 1, 0, 64, True)
    assert merged.size == (256, 256)
    for editing in ("structured guidance", "A-STAR"):
        edited, *_, info = app.run_generation("tiny-sd", "a red cat", "", 2, 1, 7.5, 128, 128, 9, False, 1.0, 1, 0, 64,
                                              False, editing)  # fmt: skip
        assert edited.size == (128, 128) and "tiny-sd" in info
    scene, _, _, _, subjects, info = app.run_generation(
        "shapes-sd", "a red circle and a blue square", "", 2, 0, 5.0, 64, 64, 9, False, 1.0, 1, 0, 64, False, "none",
        "a red circle\n\na blue square\n",
    )  # fmt: skip
    assert scene.size == (64, 64) and subjects.width > 3 * subjects.height  # 2 references, plain and IR scenes
    assert "IR-Diffusion with 2 subject references" in info


def test_handler_generates_video_and_reports_bad_input():
    import gradio as gr

    app = _load_app()
    image, video, grid, mask, _, info = app.run_generation("tiny-wan", "a boat", "", 1, 0, 5.0, 64, 64, 5)
    assert video.endswith(".mp4") and Path(video).is_file() and grid is None and mask is None
    _, video, _, mask, _, info = app.run_generation(
        "tiny-wan", "a boat", "", 2, 0, 5.0, 128, 128, 33, True, 1.0, 1, 0, 64
    )
    assert Path(video).is_file() and mask is not None and "mask density" in info
    with pytest.raises(gr.Error, match="radial attention is for video models"):
        app.run_generation("tiny-sd", "x", "", 1, 0, 5.0, 64, 64, 5, True)
    with pytest.raises(gr.Error):
        app.run_generation("nobody/nothing", "x", "", 1, 0, 5.0, 64, 64, 5)
    with pytest.raises(gr.Error):
        app.run_generation("tiny-sd", "", "", 1, 0, 5.0, 64, 64, 5)


def test_served_page_generates_through_the_api():
    from gradio_client import Client

    app = _load_app()
    demo = app.build_demo()
    demo.queue().launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        image, video, grid, mask, subjects, info = client.predict(
            "tiny-sd",
            "a blue bird",
            "",
            2,
            0,
            7.5,
            128,
            128,
            9,
            False,
            1.0,
            1,
            0,
            64,
            False,
            "none",
            "",
            api_name="/generate",
        )
        assert Path(image).is_file() and Path(grid).is_file() and mask is None and subjects is None
        assert "image" in info
    finally:
        demo.close()


def test_server_allows_only_presets_and_listed_models_with_one_message(tmp_path):
    import gradio as gr

    app = _load_app()
    app.build_demo(app.ServerSettings(models=("my/model",)))
    existing = tmp_path / "a-real-folder"
    existing.mkdir()
    (existing / "model_index.json").write_text("{}")
    messages = set()
    for model in (str(existing), str(tmp_path / "missing"), "/etc", "someone/else"):
        with pytest.raises(gr.Error) as info:
            app.run_generation(model, "x", "", 1, 0, 5.0, 64, 64, 0)
        messages.add(str(info.value).replace(repr(model[:200]), "MODEL"))
    assert len(messages) == 1 and "is not available on this server; choose one of: shapes-sd" in messages.pop()
    assert app.allowed_model("my/model") == "my/model" and app.allowed_model("tiny-sd") == "tiny-sd"
    app.build_demo(app.ServerSettings(allow_any_model=True))
    assert app.allowed_model(str(existing)) == str(existing)


def test_server_outputs_go_to_new_folders_in_gradios_cache_and_pipelines_are_bounded():
    from gradio.utils import get_upload_folder

    from diffattn.generation import PIPELINES

    app = _load_app()
    app.build_demo(app.ServerSettings(pipeline_cache=1))
    first = app.run_generation("tiny-wan", "a boat", "", 1, 0, 5.0, 64, 64, 5)[1]
    second = app.run_generation("tiny-wan", "a boat", "", 1, 0, 5.0, 64, 64, 5)[1]
    cache = Path(get_upload_folder()).resolve()
    assert first != second and Path(first).parent != Path(second).parent  # same model and seed: no collision
    assert all(Path(p).resolve().is_relative_to(cache) for p in (first, second))
    app.run_generation("tiny-sd", "a cat", "", 1, 0, 5.0, 128, 128, 0)
    assert [key[0] for key in PIPELINES.entries] == ["tiny-sd"]  # tiny-wan evicted


def test_the_server_runs_models_on_the_device_it_names(monkeypatch):
    """`python app.py --device cuda:1` loads every model there (default: `default_device()`); a device this machine
    lacks is refused at start."""
    app = _load_app()
    served = []
    monkeypatch.setattr(app, "serve", lambda demo, queue, **launch: served.append(app.SETTINGS.device))
    monkeypatch.setattr(sys, "argv", ["app.py", "--device", "cpu"])
    app.main()
    assert served == ["cpu"]
    monkeypatch.setattr(sys, "argv", ["app.py", "--device", "cuda:99"])
    with pytest.raises(SystemExit) as exit_info:
        app.main()
    assert exit_info.value.code == 2 and served == ["cpu"]
    app.build_demo(app.ServerSettings(device="cuda:1"))
    asked = []
    real = app.cached_pipeline
    monkeypatch.setattr(app, "cached_pipeline", lambda model, dtype, device: asked.append(device) or real(model))
    image, *_ = app.run_generation("tiny-sd", "a cat", "", 1, 0, 5.0, 128, 128, 0)
    assert image.size == (128, 128) and asked and set(asked) == {"cuda:1"}


def test_number_boxes_pass_fractions_through_and_the_request_refuses_them():
    """gradio's Number(precision=0) rounds 7.5 steps to 8 before any handler sees it; the app's boxes keep what was
    typed, and the one translation refuses a fraction naming the box (whole floats are taken as ints)."""
    import gradio as gr

    app = _load_app()
    boxes = [b for b in app.build_demo().blocks.values() if isinstance(b, gr.Number)]
    assert boxes and all(b.precision is None for b in boxes)
    assert [b.preprocess(7.5) for b in boxes] == [7.5] * len(boxes)
    request = app.ui_request("tiny-sd", "a red cat", 3.0, steps=20.0, height=64.0, width=64)
    assert (request.seed, request.steps, request.height, request.width) == (3, 20, 64, 64)
    for field, label in (("steps", "Steps"), ("height", "Height"), ("width", "Width")):
        with pytest.raises(gr.Error, match=f"{label} 7.5 is not allowed: expected a whole number"):
            app.ui_request("tiny-sd", "a red cat", 0, **{field: 7.5})
    with pytest.raises(gr.Error, match="Seed 0.5 is not allowed"):
        app.ui_request("tiny-sd", "a red cat", 0.5)
    with pytest.raises(gr.Error, match="Dense first steps 2.5 is not allowed"):
        app.radial_fields(True, 1.0, 2.5, 1, 64)
    assert app.radial_fields(True, 1.0, 2.0, 1, 64)["radial"].dense_timesteps == 2


def test_a_model_change_starts_the_model_with_its_own_prompt_and_keeps_a_typed_one():
    from diffattn.presets import GENERAL_PROMPT, PRESETS

    app = _load_app()
    # an untouched starting prompt (the one the page opened with, or any preset's) becomes the new model's own
    assert app._prompt_for("shapes-wan", "a red circle and a blue square")["value"] == "a red circle moving right"
    assert app._prompt_for("shapes-sd", "a red circle moving right")["value"] == "a red circle and a blue square"
    assert app._prompt_for("tiny-sd", "a red circle moving right")["value"] == GENERAL_PROMPT
    assert app._prompt_for("shapes-wan", "  ")["value"] == PRESETS["shapes-wan"].demo_prompt
    # what a visitor typed stays; a model that is not a preset has no prompt of its own
    assert "value" not in app._prompt_for("shapes-wan", "a blue star moving up")
    assert "value" not in app._prompt_for("someone/model", "a red circle and a blue square")
    steps, frames, prompt, methods, subjects = app._compare_defaults("shapes-wan", "a red circle and a blue square")
    assert steps["value"] == PRESETS["shapes-wan"].steps and frames["value"] == 33 and frames["visible"] is True
    assert prompt["value"] == "a red circle moving right"
    assert methods["visible"] is False and subjects["visible"] is False  # a video model compares dense with radial
    steps, frames, prompt, methods, subjects = app._compare_defaults("shapes-sd", "a blue star moving up")
    assert frames["visible"] is False and methods["visible"] is True and subjects["visible"] is True
    assert "value" not in prompt


def test_the_video_tab_says_what_the_judge_sees_in_a_shapes_wan_video():
    from diffattn.generation import generate
    from diffattn.judge import clip_verdict
    from diffattn.request import GenerationRequest

    app = _load_app()
    prompt = "a red circle moving right"
    _, _, info, _ = app.run_video("shapes-wan", prompt, 0, 3, 9, None, None, False, 0.25, 1, 0, 16)
    frames = generate(GenerationRequest("shapes-wan", prompt, seed=0, steps=3, num_frames=9)).frames
    assert f"judge: {clip_verdict(frames, prompt)}" in info and "red circle in " in info
    _, _, info, _ = app.run_video("shapes-wan", "a red cat", 0, 1, 5, None, None, False, 0.25, 1, 0, 16)
    assert "judge" not in info  # not a caption of the model's form: nothing to read


def test_the_image_tab_shows_the_attention_explorer_only_where_maps_were_recorded():
    app = _load_app()
    image, explorer, tokens, steps, token_map, _, info, _ = app.run_image(
        "shapes-sd", "a red circle", "", 0, 2, None, None, None, "plain", None, ""
    )
    assert explorer["maps"].shape[:2] == (2, 3)  # [steps, the prompt's words]
    assert tokens["visible"] and tokens["choices"] == ["1: a", "2: red", "3: circle"]
    assert steps["visible"] and steps["maximum"] == 2 and token_map["visible"] and token_map["value"] is not None
    assert "no attention maps" not in info
    _, explorer, tokens, steps, token_map, grid, info, _ = app.run_image(
        "shapes-sd", "a red circle and a blue square", "", 0, 2, None, None, None, "IR-Diffusion", None,
        "a red circle\na blue square",
    )  # fmt: skip
    assert explorer is None and grid is not None
    assert not tokens["visible"] and not steps["visible"] and not token_map["visible"] and token_map["value"] is None
    assert "no attention maps recorded with this method and model" in info

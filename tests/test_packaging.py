import subprocess
import sys
import zipfile
from pathlib import Path

import pytest


ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return next(out.glob("diffattn-*.whl"))


def test_wheel_ships_kernels_and_pipelines_inside_diffattn(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "diffattn/kernels/__init__.py" in names
    assert "diffattn/pipelines/__init__.py" in names
    assert not any(n.startswith(("kernels/", "pipelines/", "tests/")) for n in names)
    shipped = {n for n in names if n.startswith("diffattn/presets/shapes_sd/")}  # the trained preset's weights
    for part in (
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer_config.json",
    ):
        assert f"diffattn/presets/shapes_sd/{part}" in shipped
    video = {n for n in names if n.startswith("diffattn/presets/shapes_wan/")}
    for part in ("model_index.json", "transformer/diffusion_pytorch_model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):  # fmt: skip
        assert f"diffattn/presets/shapes_wan/{part}" in video
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "diffattn = diffattn.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_contents_import_without_the_source_tree(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()];"
        f"sys.path.insert(0, {str(tmp_path)!r});"
        "import diffattn, diffattn.kernels, diffattn.pipelines;"
        f"assert diffattn.kernels.__file__.startswith({str(tmp_path)!r}), diffattn.kernels.__file__;"
        "import importlib.util; assert importlib.util.find_spec('kernels') is None or "
        "'diffattn' not in importlib.util.find_spec('kernels').origin"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_editable_install_maps_the_import_names():
    import diffattn.kernels
    import diffattn.pipelines

    assert Path(diffattn.kernels.__file__).parent == ROOT / "diffattn" / "kernels"
    assert Path(diffattn.pipelines.__file__).parent == ROOT / "pipelines"


def test_a_checkout_does_not_shadow_the_hugging_face_kernels_package():
    """Python started in the repository root (`python app.py`, `python -m pytest`) has the root on sys.path, so a
    top-level folder `kernels` there would be imported in place of Hugging Face's `kernels` package, which
    transformers imports (its hub-kernels integration): every model load would then fail."""
    code = (
        "import importlib.util; spec = importlib.util.find_spec('kernels');"
        "print(spec and (spec.origin or list(spec.submodule_search_locations)[0]) or '')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    found = Path(proc.stdout.strip()).resolve() if proc.stdout.strip() else None
    if found is not None and found.is_relative_to(ROOT.resolve()):  # the real package may sit in a .venv here
        assert found.relative_to(ROOT.resolve()).parts[0] not in ("kernels", "kernels.py"), found
    proc = subprocess.run([sys.executable, "-c", "import transformers.activations"], capture_output=True, text=True,
                          cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]

"""Writing a generation's files: PNG images, MP4 (or PNG frames) for video, heatmaps, masks; never overwriting.

`result_files` names every file of a result and how to write it; `save_result` writes them next to whatever is in
a folder (a taken name gets `-1`, `-2`, ...); batch jobs write them as one transaction (`diffattn.jobs`). Every
file is written under a temporary name, flushed to disk (fsync) and then linked into place, so a crash never
leaves a half-written file under an output's name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def video_export_available() -> bool:
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        return False
    return True


def _png(image) -> Callable[[Path], None]:
    return lambda path: image.save(path, format="PNG")


def _mp4(frames: list, fps: int) -> Callable[[Path], None]:
    """Writer of an H.264 MP4 of `frames` (PIL images, a `GenerationResult`'s) at their own size."""
    from diffusers.utils import export_to_video

    # PIL images, never numpy: export_to_video scales numpy frames by 255 (it expects floats in [0, 1]; uint8 ones
    # would wrap around, white to 1). macro_block_size=1 keeps the frame size (imageio would scale it to a multiple
    # of 16), which the request's multiples of 8 leave even, as yuv420p needs
    return lambda path: export_to_video(list(frames), str(path), fps=fps, macro_block_size=1)


DEFAULT_FPS = 8  # frames per second of a saved video when a face names none


def result_files(result: Any, stem: str, fps: int = DEFAULT_FPS) -> list[tuple[str, Callable[[Path], None]]]:
    """(file name, writer(path)) for every file of a `GenerationResult`, in a fixed order: images (PNG), the video
    (MP4 with the `video` extra, else numbered PNG frames), attention heatmaps, IR-Diffusion references and grid,
    the radial mask."""
    files: list[tuple[str, Callable[[Path], None]]] = []
    for i, image in enumerate(result.images):
        files.append((f"{stem}.png" if len(result.images) == 1 else f"{stem}-{i}.png", _png(image)))
    if result.frames:
        if video_export_available():
            files.append((f"{stem}.mp4", _mp4(result.frames, fps)))
        else:
            files.extend((f"{stem}-frame{i:03d}.png", _png(frame)) for i, frame in enumerate(result.frames))
    if result.attention_grid is not None:
        files.append((f"{stem}-attention.png", _png(result.attention_grid)))
    for i, reference in enumerate(result.reference_images):
        files.append((f"{stem}-ref{i + 1}.png", _png(reference)))
    if result.subject_grid is not None:
        files.append((f"{stem}-subjects.png", _png(result.subject_grid)))
    if result.radial_mask is not None:
        files.append((f"{stem}-mask.png", _png(result.radial_mask)))
    return files


def fsync_path(path: Path) -> None:
    """Make a file's data, or a folder's entries (new links, removals), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(directory: Path, stem: str, suffix: str, write: Callable[[Path], None]) -> Path:
    """Write through `write(tmp_path)` to `<stem><suffix>` in `directory`, never replacing an existing file.

    The file is written to a temporary name and fsynced, then linked into place with an exclusive operation, so a
    crash leaves no half-written output and a name already taken gets `-1`, `-2`, ... instead of being overwritten.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(Path(tmp))
        fsync_path(Path(tmp))
        for n in range(100_000):
            target = directory / (f"{stem}{suffix}" if n == 0 else f"{stem}-{n}{suffix}")
            try:
                os.link(tmp, target)
                fsync_path(directory)
                return target
            except FileExistsError:
                continue
        raise FileExistsError(f"no free name for {stem}{suffix} in {directory}")
    finally:
        os.unlink(tmp)


def save_result(result: Any, directory: Path, stem: str, fps: int = DEFAULT_FPS) -> list[Path]:
    """Save every file of `result` into `directory` (see `result_files`) without replacing any existing file."""
    directory = Path(directory)
    paths = []
    for name, write in result_files(result, stem, fps):
        suffix = Path(name).suffix
        paths.append(write_new_file(directory, name[: -len(suffix)], suffix, write))
    return paths

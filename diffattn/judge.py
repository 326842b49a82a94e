"""A programmatic judge for shape scenes: what objects an image holds, and how well it matches its caption.

Detection: every pixel far enough from the white background is given the nearest scene colour (RGB distance);
connected regions of one colour above `min_area` pixels are objects. A region's shape is the one whose outline,
fitted to the region's bounding box, overlaps it most (intersection over union). Overlap rather than a single
number like the box fill ratio, because a generated image is smoothed by its VAE: a small star's rounded points
fill its box like a triangle (ratio 0.47 against a triangle's 0.5), while its outline still matches a star's
best. Metrics compare the detections with a scene's ground truth (or with the objects its caption names).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .scenes import COLORS, SHAPES, Scene, SceneObject, draw_shape, relation_holds


_OUTLINE_SIZE = 96  # each shape is drawn once this large, cropped to its own extent, then fitted to a region's box


def _shape_outlines() -> dict[str, Image.Image]:
    """Each shape as a greyscale mask cropped to its drawn extent (a star's box is not square: 0.95 x 0.9)."""
    outlines = {}
    for shape in SHAPES:
        canvas = Image.new("L", (_OUTLINE_SIZE, _OUTLINE_SIZE), 0)
        draw_shape(ImageDraw.Draw(canvas), shape, (0, 0, _OUTLINE_SIZE, _OUTLINE_SIZE), 255)
        outlines[shape] = canvas.crop(canvas.getbbox())
    return outlines


_OUTLINES = _shape_outlines()


def classify_shape(region: np.ndarray) -> tuple[str, float]:
    """The shape whose outline, stretched to the region's box, overlaps it most; and that overlap (IoU).

    region: bool [h, w], the object's pixels inside its bounding box.
    """
    height, width = region.shape
    best, best_iou = SHAPES[0], -1.0
    for shape, outline in _OUTLINES.items():
        fitted = np.asarray(outline.resize((width, height), Image.BILINEAR)) >= 128
        iou = float((fitted & region).sum()) / float((fitted | region).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    box: tuple[int, int, int, int]
    area: int
    fill: float
    pixels: np.ndarray | None = field(default=None, compare=False, repr=False)  # bool [y1-y0, x1-x0] in the box

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean [H, W] mask, as lists of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        queue, region = deque([(y, x)]), []
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            region.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(region)
    return regions


MAX_AREA_FRACTION = 0.25  # the scenes' largest shape covers 14% of its frame; a larger region is a coloured wash
BACKGROUND_DISTANCE = 90.0  # RGB distance from white beyond which a pixel is not background


def foreground_mask(pixels: np.ndarray, background_distance: float = BACKGROUND_DISTANCE) -> np.ndarray:
    """bool [H, W]: the pixels of an RGB array [H, W, 3] (0-255) farther than `background_distance` from white."""
    return np.linalg.norm(np.asarray(pixels, dtype=np.float32) - 255.0, axis=-1) > background_distance


def detect_objects(
    image: Image.Image, *, min_area: int = 20, background_distance: float = BACKGROUND_DISTANCE
) -> list[Detection]:
    """Objects in an image, largest first. Regions under `min_area` pixels or over MAX_AREA_FRACTION of the image
    are not objects (specks; a background that is not white, as an untrained model draws)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float32)  # [K, 3]
    foreground = foreground_mask(pixels, background_distance)
    nearest = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1).argmin(-1)  # [H, W]
    detections = []
    for k, name in enumerate(names):
        for region in _components(foreground & (nearest == k)):
            if len(region) < min_area or len(region) > MAX_AREA_FRACTION * foreground.size:
                continue
            ys, xs = np.array(region).T
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            fill = len(region) / ((box[2] - box[0]) * (box[3] - box[1]))
            mask = np.zeros((box[3] - box[1], box[2] - box[0]), dtype=bool)
            mask[ys - box[1], xs - box[0]] = True
            shape, _ = classify_shape(mask)
            detections.append(Detection(shape, name, box, len(region), fill, mask))
    return sorted(detections, key=lambda d: -d.area)


def subject_mask(image: Image.Image, subject: str) -> np.ndarray:
    """A segmenter for shape scenes: float [H, W] mask (1 inside) of the object that best matches `subject` ("a red
    circle": shape and colour, else shape, else colour; the largest among equals); all zeros when none matches.
    IR-Diffusion's pipeline takes it as `segmenter` for the shapes model, in place of upstream's GroundingDINO + SAM
    for photographs."""
    said = set(subject.lower().replace(",", " ").split())
    out = np.zeros((image.height, image.width), dtype=np.float32)
    best, best_score = None, 0
    for detection in detect_objects(image):  # largest first: among equal matches the largest wins
        score = 2 * (detection.shape in said) + (detection.color in said)
        if score > best_score:
            best, best_score = detection, score
    if best is not None:
        x0, y0, x1, y1 = best.box
        out[y0:y1, x0:x1] = best.pixels
    return out


def subjects_kept(references: list[Image.Image], scene: Image.Image) -> float:
    """Share of the references whose object (the largest detected in each) appears in `scene` with the same shape
    and colour: how consistent a multi-subject scene is with its subjects' references (IR-Diffusion's goal)."""
    found = {(d.shape, d.color) for d in detect_objects(scene)}
    kept = 0
    for reference in references:
        objects = detect_objects(reference)
        kept += bool(objects) and (objects[0].shape, objects[0].color) in found
    return kept / len(references) if references else 0.0


def agrees(scene: Scene, detections: list[Detection]) -> bool:
    """The detections are exactly the scene's (shape, colour) objects."""
    return Counter((d.shape, d.color) for d in detections) == Counter((o.shape, o.color) for o in scene.objects)


@dataclass
class SceneScores:
    object_recall: float  # ground-truth shapes found (any colour)
    binding: float  # ground-truth objects found with the right colour on the right shape
    count_correct: bool  # as many objects detected as the scene has
    position_correct: bool | None  # the caption's relation holds between the detected objects (None: no relation)


def score_scene(objects: list[SceneObject], relation: str | None, detections: list[Detection]) -> SceneScores:
    """Scores of one image against what it should show."""
    shapes_left = Counter(d.shape for d in detections)
    pairs = {(d.shape, d.color): d for d in detections}
    found = bound = 0
    for obj in objects:
        if shapes_left[obj.shape] > 0:
            shapes_left[obj.shape] -= 1
            found += 1
        bound += (obj.shape, obj.color) in pairs
    position = None
    if relation is not None and len(objects) >= 2:
        a = pairs.get((objects[0].shape, objects[0].color))
        b = pairs.get((objects[1].shape, objects[1].color))
        position = a is not None and b is not None and relation_holds(relation, a.center, b.center)
    return SceneScores(found / len(objects), bound / len(objects), len(detections) == len(objects), position)


def summarize(scores: list[SceneScores]) -> dict[str, float]:
    """Mean metrics over images (position over the images whose caption has a relation)."""
    positions = [s.position_correct for s in scores if s.position_correct is not None]
    return {
        "object_recall": float(np.mean([s.object_recall for s in scores])),
        "attribute_binding": float(np.mean([s.binding for s in scores])),
        "count_accuracy": float(np.mean([s.count_correct for s in scores])),
        "position_accuracy": float(np.mean(positions)) if positions else float("nan"),
        "images": len(scores),
    }


def describe(image: Image.Image) -> str:
    """What the judge sees in a shapes image, in words: "a red circle, a blue square" (largest first), or "nothing"."""
    found = detect_objects(image)
    return ", ".join(f"a {d.color} {d.shape}" for d in found) if found else "nothing"


# --------------------------------------------------------------------------------------------- moving scenes

DIRECTION_FRAMES = 8  # frames the motion direction is read from: a clip's shapes never bounce that early


@dataclass(frozen=True)
class TrackVerdict:
    """One captioned object of a clip: in how many frames the judge finds it (colour and shape), where (box
    centres, None where absent), and which way its track starts moving."""

    color: str
    shape: str
    direction: str  # the caption's
    present: float  # fraction of frames with a detection of this colour and shape
    centers: tuple[tuple[float, float] | None, ...]
    found_direction: str | None
    # the same read from the largest region of its colour alone in every frame: what a detector of colour and motion
    # sees, steadier when a model draws a shape in pieces (a sliver read as the right shape no longer moves the track)
    color_direction: str | None = None

    @property
    def kept(self) -> bool:
        """Present in at least 90% of the frames."""
        return self.present >= 0.9

    @property
    def moves_right(self) -> bool:
        return self.found_direction == self.direction

    @property
    def color_moves_right(self) -> bool:
        return self.color_direction == self.direction


def parse_clip_caption(caption: str) -> list[tuple[str, str, str]]:
    """(colour, shape, direction) of each "a <colour> <shape> moving <direction>" part of a clip caption."""
    out = []
    for part in caption.split(" and "):
        words = part.split()
        if len(words) != 5 or words[3] != "moving":
            raise ValueError(f"caption part {part!r} is not allowed: expected 'a <colour> <shape> moving <direction>'")
        out.append((words[1], words[2], words[4]))
    return out


def track_direction(centers: list[tuple[float, float] | None], frames: int = DIRECTION_FRAMES) -> str | None:
    """The way a track starts moving: the larger axis of the displacement between the first and the last of its
    first `frames` frames where it was found (None: found fewer than twice, or moved under 2 px)."""
    found = [c for c in centers[:frames] if c is not None]
    if len(found) < 2:
        return None
    dx, dy = found[-1][0] - found[0][0], found[-1][1] - found[0][1]
    if max(abs(dx), abs(dy)) < 2:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _box_center(box: tuple[int, int, int, int]) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    return (x0 + x1) / 2, (y0 + y1) / 2


def judge_clip(frames: list[Image.Image], caption: str) -> list[TrackVerdict]:
    """Per captioned object: presence over the frames (colour and shape) and the direction of its track (in each
    frame the centre of the largest region of its colour and shape, else of its colour), and of its colour's track
    (the largest region of its colour)."""
    wanted = parse_clip_caption(caption)
    detections = [detect_objects(frame) for frame in frames]
    verdicts = []
    for color, shape, direction in wanted:
        present = sum(any(d.color == color and d.shape == shape for d in found) for found in detections)
        centers: list[tuple[float, float] | None] = []
        color_centers: list[tuple[float, float] | None] = []
        for found in detections:
            colored = [d for d in found if d.color == color]
            # the largest region of its colour and shape, else of its colour (a blurred shape may read as another)
            same = [d for d in colored if d.shape == shape] or colored
            centers.append(_box_center(same[0].box) if same else None)
            color_centers.append(_box_center(colored[0].box) if colored else None)
        verdicts.append(
            TrackVerdict(color, shape, direction, present / max(len(frames), 1), tuple(centers),
                         track_direction(centers), track_direction(color_centers))
        )  # fmt: skip
    return verdicts


def clip_verdict(frames: list[Image.Image], caption: str) -> str | None:
    """What the judge finds of a clip's captioned objects, in words ("red circle in 97% of frames, moving right
    (as captioned)", and where the colour's own track goes another way than the object's, ", its red region moving
    right"); None when the caption is not of the clip form ("a <colour> <shape> moving <direction>")."""
    try:
        verdicts = judge_clip(frames, caption)
    except ValueError:
        return None
    parts = []
    for v in verdicts:
        moving = f"moving {v.found_direction}" if v.found_direction else "not moving"
        mark = "as captioned" if v.moves_right else f"captioned {v.direction}"
        part = f"{v.color} {v.shape} in {v.present:.0%} of frames, {moving} ({mark})"
        if v.color_direction != v.found_direction:  # a model drawing the object in pieces can throw its track off
            part += f", its {v.color} region " + (f"moving {v.color_direction}" if v.color_direction else "not moving")
        parts.append(part)
    return "; ".join(parts)

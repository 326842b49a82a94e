"""Procedural scenes of coloured shapes with captions and ground truth: the data of the `shapes-sd` preset.

    scene = render_scene(seed=3)          # Scene(image: PIL 64x64, caption: str, objects: [SceneObject], relation)
    scene.caption                         # e.g. "a small green star to the left of a yellow triangle"

Objects never overlap, sit on a white background and use a few saturated colours whose hues are far apart, so
colour segmentation and a bounding-box fill ratio recover them (`diffattn.judge`). Seeded and deterministic.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from .validation import check_bool, check_int_range, check_number


COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 14, "large": 24}
RELATIONS = ("to the left of", "to the right of", "above", "below")
BACKGROUND = (255, 255, 255)
STAR_INNER = 0.4  # inner/outer radius: fill ratio 0.34, far from the triangle's 0.5


@dataclass(frozen=True)
class SceneObject:
    """One shape: box = (x0, y0, x1, y1) in pixels, inclusive of x0/y0 and exclusive of x1/y1."""

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def phrase(self, with_size: bool = False) -> str:
        words = [self.size] if with_size else []
        return " ".join(["a", *words, self.color, self.shape])


@dataclass
class Scene:
    image: Image.Image
    caption: str
    objects: list[SceneObject]
    relation: str | None = None  # between objects[0] and objects[1], as the caption states it
    seed: int = 0
    extra: dict = field(default_factory=dict)


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], margin: float = 2.0) -> bool:
    """Whether point a is `relation` point b (image coordinates: y grows downwards)."""
    (ax, ay), (bx, by) = a, b
    if relation == "to the left of":
        return ax + margin < bx
    if relation == "to the right of":
        return ax > bx + margin
    if relation == "above":
        return ay + margin < by
    if relation == "below":
        return ay > by + margin
    raise ValueError(f"relation={relation!r} is not allowed: expected one of {', '.join(RELATIONS)}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    """Draw `shape` filled with `rgb` in `box` = (x0, y0, x1, y1), x1/y1 exclusive (the scenes' and the judge's
    outline)."""
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=rgb)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=rgb)
    elif shape == "star":
        cx, cy, outer = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0) / 2
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else outer * STAR_INNER
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=rgb)
    else:
        raise ValueError(f"shape={shape!r} is not allowed: expected one of {', '.join(SHAPES)}")


def render_scene(seed: int, *, size: int = 64, max_objects: int = 3, relation_probability: float = 0.5) -> Scene:
    """A seeded scene of 1 to `max_objects` non-overlapping shapes with distinct (colour, shape) pairs (fewer where
    the canvas has no room left). `size` >= 32: the shapes keep their pixel sizes (SIZES) on any canvas."""
    check_int_range("size", size, max(SIZES.values()) + 8)
    check_int_range("max_objects", max_objects, 1, len(SHAPES) * len(COLORS))
    check_number("relation_probability", relation_probability, 0.0, 1.0)
    rng = random.Random(seed)
    count = rng.randint(1, max_objects)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    objects: list[SceneObject] = []
    used = set()
    while len(objects) < count:
        shape, color, size_name = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))
        if (shape, color) in used:
            continue
        side = SIZES[size_name]
        for _ in range(100):  # place without overlap (2 px apart)
            x0, y0 = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[2] + 2 <= o.box[0] or o.box[2] + 2 <= box[0] or box[3] + 2 <= o.box[1] or o.box[3] + 2 <= box[1]
                   for o in objects):  # fmt: skip
                break
        else:
            break  # no room: keep the scene smaller
        used.add((shape, color))
        objects.append(SceneObject(shape, color, size_name, box))
        draw_shape(draw, shape, box, COLORS[color])
    relation = None
    if len(objects) == 2 and rng.random() < relation_probability:
        holding = [r for r in RELATIONS if relation_holds(r, objects[0].center, objects[1].center)]
        relation = rng.choice(holding) if holding else None
    if relation is not None:
        caption = f"{objects[0].phrase(with_size=True)} {relation} {objects[1].phrase()}"
    else:
        caption = " and ".join(o.phrase() for o in objects)
    return Scene(image, caption, objects, relation, seed)


# ------------------------------------------------------------------------------------------------ moving scenes

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SPEEDS = (1, 2)  # px a frame a moving shape may take
HELD_OUT_CLIP_SEED = 2 * 10**9  # evaluation clips are drawn from here on; training streams stay below


def check_clip_motion(speeds, bounce: bool, num_frames: int, size: int = 64) -> tuple[int, ...]:
    """`speeds` as a tuple of distinct ints >= 1 (px a frame), and, without bounces, room in a `size`-px frame for
    the largest shape's whole track at the fastest of them; else a ValueError naming what is wrong."""
    if isinstance(speeds, (str, bytes)) or not isinstance(speeds, (tuple, list)) or not speeds:
        raise ValueError(f"speeds={speeds!r} is not allowed: expected a non-empty tuple of ints >= 1 (px a frame)")
    for speed in speeds:
        check_int_range("speeds", speed, 1)
    if len(set(speeds)) != len(speeds):
        raise ValueError(f"speeds={tuple(speeds)} is not allowed: expected distinct speeds")
    check_bool("bounce", bounce)
    speeds = tuple(speeds)
    room, travel = size - max(SIZES.values()) * size // 64, max(speeds) * (num_frames - 1)
    if not bounce and travel > room:
        raise ValueError(
            f"bounce=False with speeds={speeds} and num_frames={num_frames} is not allowed: a shape at "
            f"{max(speeds)} px a frame travels {travel} px, more than the {room} px a {size}-px frame leaves its "
            "largest shape; expected slower speeds, fewer frames or bounce=True"
        )
    return speeds


@dataclass(frozen=True)
class MovingObject:
    """One moving shape; boxes[t] = (x0, y0, x1, y1) in frame t (x1/y1 exclusive). `direction` is the way it starts
    moving (the caption's); it bounces off the frame's edges, reversing that axis. `speed`: px a frame, every frame,
    or on average over the frames when its clip's speed varies (`render_clip(..., steady=False)`)."""

    shape: str
    color: str
    size: str
    direction: str
    speed: int
    boxes: tuple[tuple[int, int, int, int], ...]

    def phrase(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"


@dataclass
class Clip:
    frames: list[Image.Image]
    caption: str
    objects: list[MovingObject]
    seed: int = 0


def _track(
    x0: int, y0: int, side: int, ux: int, uy: int, moves: list[int], size: int
) -> list[tuple[int, int, int, int]]:
    """Boxes of a side x side shape starting at (x0, y0), then after each of `moves` (px) one step along the unit
    direction (ux, uy), bouncing inside [0, size): len(moves) + 1 boxes."""
    boxes = [(x0, y0, x0 + side, y0 + side)]
    for move in moves:
        nx, ny = x0 + ux * move, y0 + uy * move
        if not 0 <= nx <= size - side:
            ux, nx = -ux, x0 - ux * move
        if not 0 <= ny <= size - side:
            uy, ny = -uy, y0 - uy * move
        x0, y0 = nx, ny
        boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 2) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def render_clip(
    seed: int,
    num_frames: int = 33,
    *,
    size: int = 64,
    max_objects: int = 2,
    speeds: tuple[int, ...] = SPEEDS,
    bounce: bool = True,
    steady: bool = True,
) -> Clip:
    """A seeded clip of `num_frames` frames: 1 to `max_objects` shapes with distinct (colour, shape) pairs, each
    moving left, right, up or down at one of `speeds` px a frame from a start that leaves room to move that way,
    bouncing off the edges, never crossing each other (2 px apart in every frame; a shape that finds no such track is
    left out). Caption: "a red circle moving right" or "a blue square moving up and a green star moving left".

    `bounce=False` draws every start so that the whole track fits in the frame: each object moves its captioned way
    in every frame (a clip whose caption says all of its motion). It needs speed * (num_frames - 1) px of room for
    the largest shape at the fastest speed, and says so otherwise.

    `steady=False` varies each shape's speed from frame to frame: each move is drawn uniformly from 0..2 * speed px
    (so `speed` is its mean), always the same way until a bounce. The caption still says the way; how far the shape
    has gone by a frame is known only from the frames near it (constant speed makes any frame of the track a guide
    to any other). Without bounces the moves are drawn again until the whole track fits."""
    check_int_range("num_frames", num_frames, 1)
    check_int_range("size", size, 16)  # shapes scale with the frame: 16 px draws the small ones 3 px wide
    check_int_range("max_objects", max_objects, 1, len(SHAPES) * len(COLORS))
    speeds = check_clip_motion(speeds, bounce, num_frames, size)
    check_bool("steady", steady)
    rng = random.Random(seed)
    count = rng.randint(1, max_objects)
    objects: list[MovingObject] = []
    used = set()
    attempts = 0
    while len(objects) < count and attempts < 200:
        attempts += 1
        shape, color, size_name = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))
        if (shape, color) in used:
            continue
        side = SIZES[size_name] * size // 64
        direction = rng.choice(list(DIRECTIONS))
        speed = rng.choice(speeds)
        ux, uy = DIRECTIONS[direction]
        room = size - side
        moves = [speed] * (num_frames - 1)
        # check_clip_motion leaves room for speed * (num_frames - 1) px, the mean travel: a draw fits half the time
        # or more, so this loop ends
        while not steady:
            moves = [rng.randint(0, 2 * speed) for _ in range(num_frames - 1)]
            if bounce or sum(moves) <= room:
                break
        # the third of the frame that leaves the most room ahead, or without bounces where the whole track fits
        ahead = room // 3 if bounce else room - sum(moves)

        def start(axis_step: int) -> int:
            if axis_step > 0:
                return rng.randint(0, ahead)
            if axis_step < 0:
                return rng.randint(room - ahead, room)
            return rng.randint(0, room)

        boxes = _track(start(ux), start(uy), side, ux, uy, moves, size)
        if any(_overlap(a, b) for other in objects for a, b in zip(boxes, other.boxes)):
            continue  # shapes never cross, so every object stays visible in every frame
        used.add((shape, color))
        objects.append(MovingObject(shape, color, size_name, direction, speed, tuple(boxes)))
    frames = []
    for t in range(num_frames):
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for obj in objects:  # later objects are drawn over earlier ones where they cross
            draw_shape(draw, obj.shape, obj.boxes[t], COLORS[obj.color])
        frames.append(image)
    return Clip(frames, " and ".join(o.phrase() for o in objects), objects, seed)

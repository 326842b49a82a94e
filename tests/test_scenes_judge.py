"""Shape scenes and their judge: the judge against the generator's ground truth and hand-drawn images."""

import re

import numpy as np
from PIL import Image, ImageDraw

from diffattn.judge import Detection, agrees, detect_objects, score_scene, summarize
from diffattn.scenes import COLORS, RELATIONS, SHAPES, SceneObject, relation_holds, render_scene


def test_judge_agrees_with_ground_truth_on_generated_scenes():
    results = [agrees(scene, detect_objects(scene.image)) for scene in map(render_scene, range(300))]
    assert np.mean(results) >= 0.98


def test_scenes_are_seeded_with_captions_in_prompt_style():
    a, b = render_scene(11), render_scene(11)
    assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    colour, shape = "|".join(COLORS), "|".join(SHAPES)
    phrase = rf"a (small |large )?({colour}) ({shape})"
    pattern = re.compile(rf"^{phrase}(( and | (?:{'|'.join(RELATIONS)}) ){phrase})*$")
    scenes = [render_scene(seed) for seed in range(200)]
    assert all(pattern.match(s.caption) for s in scenes), [s.caption for s in scenes if not pattern.match(s.caption)]
    assert {len(s.objects) for s in scenes} == {1, 2, 3} and any(s.relation for s in scenes)
    for s in scenes:
        if s.relation:
            assert relation_holds(s.relation, s.objects[0].center, s.objects[1].center)
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64


def test_detection_on_a_hand_drawn_image():
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([4, 4, 23, 23], fill=COLORS["blue"])  # a 20x20 square
    draw.ellipse([36, 36, 59, 59], fill=COLORS["red"])  # a 24x24 circle
    found = {(d.shape, d.color): d for d in detect_objects(image)}
    assert set(found) == {("square", "blue"), ("circle", "red")}
    assert found[("square", "blue")].box == (4, 4, 24, 24) and found[("square", "blue")].area == 400


def test_scores_on_a_hand_computed_case():
    truth = [
        SceneObject("circle", "red", "small", (0, 0, 10, 10)),
        SceneObject("square", "blue", "small", (30, 0, 40, 10)),
    ]
    swapped = [
        Detection("circle", "blue", (0, 0, 10, 10), 80, 0.8),
        Detection("square", "red", (30, 0, 40, 10), 100, 1.0),
    ]
    scores = score_scene(truth, "to the left of", swapped)
    assert (scores.object_recall, scores.binding, scores.count_correct, scores.position_correct) == (
        1.0,
        0.0,
        True,
        False,
    )
    right = [Detection("circle", "red", (0, 0, 10, 10), 80, 0.8)]
    scores = score_scene(truth, "to the left of", right)
    assert (scores.object_recall, scores.binding, scores.count_correct) == (0.5, 0.5, False)
    summary = summarize([score_scene(truth, None, swapped), scores])
    assert summary["object_recall"] == 0.75 and summary["attribute_binding"] == 0.25 and summary["images"] == 2
    assert relation_holds("above", (5, 5), (5, 30)) and not relation_holds("below", (5, 5), (5, 30))

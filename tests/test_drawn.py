"""Issue 31: the drawn look of the synthetic world, the out-of-distribution test set and its `ood` block in
`hyperowl eval`'s summary.json."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
from PIL import Image

from hyperowl.cli import main
from hyperowl.data import synthetic as syn
from hyperowl.data.synthetic.ood import OOD_TASKS, ood_examples, write_ood


def _drawn(task: str, n: int, **kw):
    return list(syn.iter_examples("test", n_single=n, tasks=[task], drawn=True, **kw))


def _object_pixels(img: np.ndarray, mask: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Pixels of the object's area that differ clearly from the background there (its colour, edges aside)."""
    far = np.abs(img.astype(int) - bg.astype(int)).max(-1) > 60
    return img[mask & far]


def test_drawn_look_is_deterministic_and_leaves_the_plain_look_alone():
    a = [np.asarray(im) for ex in _drawn("single/caption", 6) for im in ex.images]
    b = [np.asarray(im) for ex in _drawn("single/caption", 6) for im in ex.images]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == 6
    plain = next(syn.iter_examples("test", n_single=1, tasks=["single/caption"]))
    drawn = _drawn("single/caption", 1)[0]
    # Plain scenes keep their old canonical form (so their hashes and every plain dataset stay as they were).
    assert "look" not in plain.scenes[0].to_dict() and all(len(o) == 5 for o in plain.scenes[0].to_dict()["objects"])
    assert drawn.scenes[0].look and syn.Scene.from_dict(drawn.scenes[0].to_dict()) == drawn.scenes[0]
    sizes = {ex.scenes[0].image_size for ex in _drawn("single/caption", 40)}
    lo, hi = syn.DRAWN_SOURCE_SIZES
    assert len(sizes) > 20 and lo <= min(sizes) and max(sizes) <= hi


@pytest.mark.parametrize("task", ["single/colour", "single/shape", "single/position"])
def test_drawn_answers_match_the_drawn_pixels(task):
    """The named object is drawn in a colour that reads as its name (the dominant non-background colour of its
    area), at a size of its name relative to the image; inside its third of the image in both directions for a
    question about positions, anywhere (box inside the image) for the others (`Scene.free`)."""
    checked = 0
    for ex in _drawn(task, 24):
        scene = ex.scenes[0]
        assert scene.free == (task != "single/position") or len(scene.objects) == syn.MAX_OBJECTS  # crowded: thirds
        if task != "single/position":
            key = "kind" if task == "single/colour" else "colour"
            target, = [o for o in scene.objects if re.search(rf"\b{getattr(o, key)}\b", ex.prompt)]
            assert (target.colour if task == "single/colour" else target.kind) == ex.answer
        shown = scene.scaled(min(scene.image_size, syn.DRAWN_RENDER_SIDE))  # the coordinates of ex.images[0]
        img = np.asarray(ex.images[0])
        ids = syn.object_map(shown)
        bg = syn.drawn_background(shown.background, shown.image_size, shown.bg_variant)
        for i, o in enumerate(shown.objects):
            s, d = shown.image_size, shown.diameter(o)
            r, c = shown.cell(o)
            x0, y0 = o.x - d // 2, o.y - d // 2
            if scene.free:
                assert 0 <= x0 and x0 + d - 1 < s and 0 <= y0 and y0 + d - 1 < s
            else:
                assert c * s / 3 <= x0 and x0 + d - 1 < (c + 1) * s / 3 and r * s / 3 <= y0 and y0 + d - 1 < (r + 1) * s / 3
            lo, hi = syn.DRAWN_SIZE_FRACTION[o.size]
            assert lo - 0.02 <= scene.diameter(scene.objects[i]) / scene.image_size <= hi + 0.02
            px = _object_pixels(img, ids == i + 1, bg)
            if len(px) < 6:  # a tiny outline after JPEG: nothing to read
                continue
            assert syn.nearest_colour(np.median(px, 0))[0] == o.colour
            ys, xs = np.nonzero((ids == i + 1) & (np.abs(img.astype(int) - bg.astype(int)).max(-1) > 60))
            if scene.free:  # drawn where it says (the pixels' box centred on its centre, within a few pixels)
                cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
                assert abs(cx - o.x) < 0.1 * d + 2 and abs(cy - o.y) < 0.1 * d + 2
            else:
                assert (int(ys.mean() * 3 // s), int(xs.mean() * 3 // s)) == (r, c)  # position by thirds
            checked += 1
    assert checked > 30


def test_free_scenes_lie_anywhere_and_are_never_asked_about_thirds():
    """Drawn examples of FREE_TASKS place objects anywhere (apart, inside the image; many cross a third's
    border, which the thirds layout never does), no other task does, and their extra turns never ask a
    position, relation or caption (answers by thirds)."""
    exs = list(syn.iter_examples("train", n_single=240, n_distractor=40, drawn=True, turns=3, seed=4))
    crossing = 0
    for ex in exs:
        sub = ex.task.split("/", 1)[1]
        for scene in ex.scenes:
            assert scene.free == (sub in syn.FREE_TASKS) or (not scene.free and len(scene.objects) >= 3)
            if not scene.free:
                continue
            s, gap = scene.image_size, syn.world.FREE_GAP * scene.image_size
            for i, o in enumerate(scene.objects):
                d = scene.diameter(o)
                x0, y0 = o.x - d // 2, o.y - d // 2
                assert 0 < x0 and x0 + d < s and 0 < y0 and y0 + d < s
                crossing += int(x0 * 3 // s != (x0 + d - 1) * 3 // s or y0 * 3 // s != (y0 + d - 1) * 3 // s)
                for p in scene.objects[i + 1:]:
                    assert abs(o.x - p.x) > (d + scene.diameter(p)) / 2 + gap or \
                        abs(o.y - p.y) > (d + scene.diameter(p)) / 2 + gap
        if any(sc.free for sc in ex.scenes):
            assert ex.extra and all(task in syn.FREE_TASKS for task, _, _ in ex.extra)
    assert crossing > 50
    free = next(sc for ex in exs for sc in ex.scenes if sc.free)
    back = syn.Scene.from_dict(free.to_dict())  # objects come back sorted
    assert back.free and set(back.objects) == set(free.objects) and back.hash == free.hash
    assert all(syn.ask(free, t, random.Random(0)) is None for t in ("position", "relation", "caption"))


def test_drawn_videos_have_several_lengths_and_the_asked_direction():
    exs = list(syn.iter_examples("test", n_video=30, tasks=["video/direction"], drawn=True))
    lengths = {len(ex.video_scenes[0]) for ex in exs}
    assert lengths <= set(syn.DRAWN_VIDEO_FRAMES) and len(lengths) >= 5 and max(lengths) == 32
    for ex in exs:
        name = re.search(r"the (\w+ \w+) mov", ex.prompt).group(1)
        first, last = ([o for o in f.objects if o.name == name][0] for f in (ex.video_scenes[0][0], ex.video_scenes[0][-1]))
        dx, dy = last.x - first.x, last.y - first.y
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}
        assert moved[ex.answer] > 0 and max(moved, key=moved.get) == ex.answer
    mixed = list(syn.iter_examples("test", n_video=40, tasks=["video"], drawn=0.5, video_frames=8))
    plain = [ex for ex in mixed if not ex.video_scenes[0][0].look]
    assert 8 < len(plain) < 32 and {len(ex.video_scenes[0]) for ex in plain} == {8}  # the plain look keeps --frames


def test_drawn_dataset_files_are_the_processor_resized_sources(tmp_path):
    paths = syn.write_dataset(tmp_path, {"test": {"single": 4, "video": 1}}, seed=3, drawn=1.0)
    meta = json.loads(paths["meta"].read_text())
    assert meta["drawn"] == 1.0 and meta["splits"]["test"]["drawn"] == 5
    rows = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert {r["look"] for r in rows} == {"drawn"}
    exs = list(syn.iter_examples("test", n_single=4, n_video=1, seed=3, drawn=True))
    for row, ex in zip(rows, exs):
        for rel, im in zip(row["images"], ex.images):
            on_disk = Image.open(tmp_path / rel)
            assert on_disk.size == (64, 64)
            assert np.array_equal(np.asarray(on_disk), np.asarray(im.resize((64, 64), Image.Resampling.BICUBIC)))


def test_stage0_stream_reads_drawn_scenes():
    from hyperowl.config import PRESETS
    from hyperowl.train.vision_pretrain import SceneStream

    cfg = PRESETS["owl3-synthetic"].vision
    plain = SceneStream(cfg, 0).batch(3)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(plain, SceneStream(cfg, 0, drawn=0.0).batch(3)))
    px, labels, owner = SceneStream(cfg, 0, drawn=1.0).batch(4)
    assert px.shape == (4, 3, 64, 64) and labels.shape == (4, 64, 4) and int(owner.max()) >= 1
    assert not np.array_equal(px.numpy(), plain[0][:3].numpy()[:1].repeat(4, 0))
    # free: the drawn scenes' objects anywhere; the same stream with free=0 is the old one
    same = SceneStream(cfg, 0, drawn=1.0, free=0.0).batch(4)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip((px, labels, owner), same))
    free = SceneStream(cfg, 0, drawn=1.0, free=1.0)
    scenes = [syn.random_scene(free.drawn_rng, 64, drawn=True, free=True) for _ in range(20)]
    assert sum(s.free for s in scenes) >= 18
    fpx, flabels, fowner = free.batch(4)
    assert fpx.shape == px.shape and int(fowner.max()) >= 1 and not np.array_equal(fpx.numpy(), px.numpy())


def test_ood_set_is_deterministic_other_renderer_and_world_wording(tmp_path):
    a, b = write_ood(tmp_path / "a", n=6, seed=5), write_ood(tmp_path / "b", n=6, seed=5)
    assert a.read_text() == b.read_text()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    for r in rows:
        assert (a.parent / r["images"][0]).read_bytes() == (b.parent / r["images"][0]).read_bytes()
    assert {r["task"] for r in rows} == {f"ood/{t}" for t in OOD_TASKS}
    assert "matplotlib" in json.loads((a.parent / "meta.json").read_text())["renderer"]
    for r in rows:  # the world's own wording, and answers read from the drawn objects
        q = r["messages"][0]["content"].removeprefix("<|image|>")
        t = r["task"].split("/")[1]
        assert any(q == tpl.format(img=ref, kind=o["kind"], colour=o["colour"]) for tpl in syn.SINGLE_TEMPLATES[t]
                   for ref in syn.SINGLE_REFS for o in r["objects"])
        if t == "count_all":
            assert r["answer"] == str(len(r["objects"]))
        img = np.asarray(Image.open(a.parent / r["images"][0]).convert("RGB"))
        assert img.shape[:2] == (r["size"], r["size"]) and 96 <= r["size"] <= 512
        for o in r["objects"]:  # the colour at the centre of each shape reads as its name (JPEG or not)
            y, x = int(o["y"]), int(o["x"])
            assert syn.nearest_colour(img[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0))[0] == o["colour"]


def test_ood_pictures_are_not_the_training_renderer():
    rec, img, _ = next(ood_examples(1, seed=1))
    # Redraw the same objects with the training renderer: other pixels (another rasteriser and background).
    s = rec["size"]
    scene = syn.Scene(tuple(syn.Obj(o["kind"], o["colour"], "large", int(o["x"]), int(o["y"]), int(o["d"]))
                            for o in rec["objects"]), "plain", s, 1, look=1)
    assert np.abs(np.asarray(img, int) - np.asarray(scene.render(), int)).mean() > 1


def test_eval_reports_the_ood_set_beside_the_test_split(tmp_path, capsys):
    syn.write_dataset(tmp_path / "drawn", {"test": {"single": 4}}, drawn=0.5)
    write_ood(tmp_path / "ood", n=3, seed=7)
    out = tmp_path / "res"
    assert main(["eval", "--data", str(tmp_path / "drawn" / "test.jsonl"), "--ood", str(tmp_path / "ood"),
                 "--out", str(out), "--batch-size", "4"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 4 and set(s["breakdown"]["look"]) == {"plain", "drawn"} and s["ood"]["n"] == 3 and set(s["ood"]["categories"]) == {f"ood/{t}" for t in OOD_TASKS}
    rows = [json.loads(line) for line in (out / "ood" / "predictions.jsonl").read_text().splitlines()]
    assert s["ood"]["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 3)
    assert "ood all" in capsys.readouterr().out
    assert main(["eval", "--data", str(tmp_path / "drawn" / "test.jsonl"), "--ood", str(tmp_path / "none"),
                 "--out", str(tmp_path / "r2")]) == 2  # one line, before the model loads
    assert "--ood" in capsys.readouterr().err


def test_drawn_colour_jitter_keeps_names():
    rng = random.Random(0)
    for name in syn.COLOUR_NAMES:
        got = [syn.jitter_colour(name, rng) for _ in range(50)]
        assert len(set(got)) > 40  # jittered
        for c in got:
            near, margin = syn.nearest_colour(c)
            assert near == name and margin >= 20

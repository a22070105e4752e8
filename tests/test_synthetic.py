"""Tests for the synthetic visual world: answers re-derived from the scenes by an independent oracle that
parses the question text, pixels, .mp4 round trips, determinism, disjoint splits, the JSONL format, CLI."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from hyperowl.data import synthetic as syn
from hyperowl.data.synthetic import COLOURS, KINDS, PLURALS, Scene
from hyperowl.errors import InputError

S = 64
COL = "|".join(COLOURS)
KIND = "|".join(KINDS)
POS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center", (1, 2): "right",
       (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}


# ---------------------------------------------------------------------------------------------------------
# An oracle written from the task descriptions, not from the generator.
# ---------------------------------------------------------------------------------------------------------


def cell(o, s):
    return o.y * 3 // s, o.x * 3 // s


def pairs(scene):
    return [(o.colour, o.kind) for o in scene.objects]


def one(scene, colour=None, kind=None):
    found = [o for o in scene.objects if (colour in (None, o.colour)) and (kind in (None, o.kind))]
    assert len(found) == 1, f"{colour} {kind} is not unique in {scene}"
    return found[0]


def named(q):
    """All 'colour kind' phrases in a question, in order."""
    return re.findall(rf"\b({COL}) ({KIND})\b", q)


def art(colour, kind):
    return ("an " if colour[0] in "aeiou" else "a ") + f"{colour} {kind}"


def single_answer(sub, q, scene):
    if sub == "colour":
        (kind,) = re.findall(rf"\b({KIND})\b", q)
        return one(scene, kind=kind).colour
    if sub == "shape":
        (colour,) = re.findall(rf"\b({COL})\b", q)
        return one(scene, colour=colour).kind
    if sub == "count":
        (plural,) = [p for p in PLURALS.values() if re.search(rf"\b{p}\b", q)]
        kind = next(k for k, p in PLURALS.items() if p == plural)
        return str(sum(o.kind == kind for o in scene.objects))
    if sub == "count_all":
        return str(len(scene.objects))
    if sub == "position":
        ((c, k),) = named(q)
        return POS[cell(one(scene, c, k), scene.image_size)]
    if sub == "size":
        ((c, k),) = named(q)
        return one(scene, c, k).size
    if sub == "relation":
        (a, b) = named(q)
        (rel,) = re.findall(r"\b(left of|right of|above|below)\b", q)
        ra, ca = cell(one(scene, *a), scene.image_size)
        rb, cb = cell(one(scene, *b), scene.image_size)
        if rel in ("left of", "right of"):
            assert ca != cb, "left/right asked about objects in one column"
            yes = ca < cb if rel == "left of" else ca > cb
        else:
            assert ra != rb, "above/below asked about objects in one row"
            yes = ra < rb if rel == "above" else ra > rb
        return "yes" if yes else "no"
    if sub == "caption":
        objs = sorted(scene.objects, key=lambda o: cell(o, scene.image_size))
        words = [art(o.colour, o.kind) for o in objs]
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    raise AssertionError(sub)


def change_between(a: Scene, b: Scene) -> str:
    if len(a.objects) != len(b.objects):
        return "count"
    only_a = [o for o in a.objects if o not in b.objects]
    only_b = [o for o in b.objects if o not in a.objects]
    assert len(only_a) == len(only_b) == 1, "more than one object changed"
    (x,), (y,) = only_a, only_b
    n = a.image_size
    diffs = [name for name, d in (("colour", x.colour != y.colour), ("shape", x.kind != y.kind),
                                  ("size", x.size != y.size), ("position", cell(x, n) != cell(y, n))) if d]
    assert len(diffs) == 1, diffs
    return diffs[0]


def oracle(ex) -> str:
    group, sub = ex.task.split("/")
    q = ex.prompt.rsplit("\n", 1)[-1].replace("<|image|>", "").replace("<|video|>", "")
    if group == "single":
        return single_answer(sub, q, ex.scenes[0])
    if group == "distractor":
        (k,) = [int(m) for m in re.findall(r"\bimage (\d+)\b", q)]
        assert k == ex.target
        return single_answer(sub, q, ex.scenes[k - 1])
    if group == "multi":
        if sub == "which":
            (pair,) = named(q)
            hits = [i for i, s in enumerate(ex.scenes, 1) if pair in pairs(s)]
            assert len(hits) == 1
            return f"image {hits[0]}"
        a, b = ex.scenes
        if sub == "same":
            return "yes" if set(a.objects) == set(b.objects) else "no"
        return change_between(a, b)
    (frames,) = ex.video_scenes
    first, last = frames[0], frames[-1]
    if sub == "direction":
        ((c, k),) = named(q)
        o0, o1 = one(first, c, k), one(last, c, k)
        dx, dy = o1.x - o0.x, o1.y - o0.y
        assert (dx == 0) != (dy == 0)
        return ("right" if dx > 0 else "left") if dx else ("down" if dy > 0 else "up")
    if sub in ("appear", "disappear"):
        before, after = set(pairs(first)), set(pairs(last))
        (new,) = (after - before) if sub == "appear" else (before - after)
        return art(*new)
    if sub == "order":
        a, b = named(q)
        when = {p: min(i for i, f in enumerate(frames) if p in pairs(f)) for p in (a, b)}
        assert when[a] != when[b]
        return "the " + " ".join(min((a, b), key=when.get))
    raise AssertionError(ex.task)


def check_layout(scene: Scene, in_cells: bool = True):
    """Objects inside the image, inside their grid cell (not moving ones), never overlapping."""
    boxes, n = [], scene.image_size
    for o in scene.objects:
        d = syn.diameter(o.size, n)
        box = (o.x - d // 2, o.y - d // 2, o.x - d // 2 + d - 1, o.y - d // 2 + d - 1)
        assert 0 <= box[0] and box[2] < n and 0 <= box[1] and box[3] < n
        if in_cells:
            r, c = cell(o, n)
            assert c * n / 3 - 1 <= box[0] and box[2] < (c + 1) * n / 3 + 1, (o, n)  # 1 px: rounded centres
            assert r * n / 3 - 1 <= box[1] and box[3] < (r + 1) * n / 3 + 1, (o, n)
        for other in boxes:
            assert box[2] < other[0] or other[2] < box[0] or box[3] < other[1] or other[3] < box[1], "overlap"
        boxes.append(box)


@pytest.fixture(scope="module")
def many():
    return list(syn.iter_examples("train", 240, 60, 60, 120, distractors=3, seed=7))


def test_answers_match_scenes(many):
    tasks = {ex.task for ex in many}
    assert tasks == set(syn.ALL_TASKS)
    for ex in many:
        assert oracle(ex) == ex.answer, (ex.task, ex.prompt, ex.answer)
        for s in ex.all_scenes():
            check_layout(s, in_cells=ex.task != "video/direction")
        assert ex.messages[1]["content"] == ex.answer


def test_answers_balanced_and_closed(many):
    by_task: dict[str, set] = {}
    for ex in many:
        by_task.setdefault(ex.task.split("/", 1)[1] if ex.task.startswith(("single", "distractor")) else ex.task,
                           set()).add(ex.answer)
    assert by_task["count"] == by_task["count_all"] == {"1", "2", "3", "4"}
    assert by_task["relation"] == by_task["multi/same"] == {"yes", "no"}
    assert by_task["size"] == {"small", "large"}
    assert by_task["multi/diff"] == set(syn.CHANGES)
    assert by_task["video/direction"] == set(syn.DIRECTIONS)
    assert by_task["multi/which"] == {"image 1", "image 2", "image 3", "image 4"}
    assert len(by_task["position"]) >= 8 and len(by_task["colour"]) == 6 and len(by_task["shape"]) == 5
    vocab = (set(COLOURS) | set(KINDS) | {"1", "2", "3", "4", "yes", "no", "small", "large"} | set(POS.values())
             | set(syn.DIRECTIONS) | set(syn.CHANGES) | {f"image {i}" for i in range(1, 5)}
             | {art(c, k) for c in COLOURS for k in KINDS} | {f"the {c} {k}" for c in COLOURS for k in KINDS})
    for ex in many:
        if not ex.task.endswith("caption"):
            assert ex.answer in vocab, ex.answer


def test_distractor_target_varies_and_is_the_asked_image(many):
    d = [ex for ex in many if ex.task.startswith("distractor/")]
    assert {ex.target for ex in d} == {1, 2, 3, 4}
    for ex in d:
        assert len(ex.scenes) == 4 and ex.prompt.count("<|image|>") == 4
        assert f"image {ex.target}" in ex.prompt.rsplit("\n", 1)[-1]


def test_render_pixels_match_scene(many):
    for ex in many[:80]:
        for scene, img in zip(ex.scenes, ex.images):
            a = np.asarray(img)
            assert a.shape == (S, S, 3)
            for o in scene.objects:
                assert tuple(a[o.y, o.x]) == COLOURS[o.colour], (o, scene.background)
            corner = a[0, 0]
            assert corner[0] == corner[1] == corner[2] >= 190  # light, neutral backgrounds
    # every kind draws a different silhouette
    masks = set()
    for k in KINDS:
        im = np.asarray(Scene((syn.Obj(k, "red", "large", 32, 32),), "white").render())
        masks.add((im[..., 1] < 128).tobytes())
    assert len(masks) == len(KINDS)


@pytest.mark.parametrize("size", [32, 48, 96, 224])
def test_other_image_sizes(size):
    for ex in syn.iter_examples("test", 24, 6, 8, 8, image_size=size, seed=size):
        for s in ex.all_scenes():
            assert s.image_size == size
            check_layout(s, in_cells=ex.task != "video/direction")
        assert oracle(ex) == ex.answer
        assert ex.images[0].size == (size, size) if ex.scenes else ex.videos[0][0].size == (size, size)


def test_background_variants_are_distinct_images():
    for bg, n in syn.BG_VARIANTS.items():
        seen = {Scene((), bg, S, v).render().tobytes() for v in range(min(n, 20))}
        assert len(seen) == min(n, 20), bg
    scene = next(syn.iter_examples("train", 1, seed=0)).scenes[0]
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))).hash == scene.hash


def test_deterministic_and_seeded():
    a = [(e.prompt, e.answer, [s.hash for s in e.all_scenes()]) for e in syn.iter_examples("val", 10, 5, 5, 5, seed=3)]
    b = [(e.prompt, e.answer, [s.hash for s in e.all_scenes()]) for e in syn.iter_examples("val", 10, 5, 5, 5, seed=3)]
    c = [(e.prompt, e.answer, [s.hash for s in e.all_scenes()]) for e in syn.iter_examples("val", 10, 5, 5, 5, seed=4)]
    assert a == b and a != c


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_generate_split_files_identical_across_runs(tmp_path):
    paths = [syn.generate_split(tmp_path / n, "train", 6, 3, 2, 2, distractors=2, seed=1, progress=False)
             for n in ("a", "b")]
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa.keys() == fb.keys() and any(k.endswith(".mp4") for k in fa)
    assert all(fa[k] == fb[k] for k in fa), [k for k in fa if fa[k] != fb[k]]
    assert paths[0].name == "train.jsonl"


def test_workers_write_the_same_bytes(tmp_path, monkeypatch):
    """Several processes, each writing pieces of a split, give the files one process writes (drawn and plain
    looks, videos, extra turns, an excluded scene file), whatever the piece size."""
    from hyperowl.data.synthetic import writer

    monkeypatch.setattr(writer, "_CHUNK", 7)  # many pieces out of a small dataset
    sizes = {"train": 40, "val": 0, "test": 12}
    kw = dict(seed=2, video_frames=4, distractors=2, progress=False, train_turns=2, train_progressive=0.5, drawn=0.5)
    one = syn.write_dataset(tmp_path / "one", sizes, **kw, workers=1)
    syn.write_dataset(tmp_path / "two", sizes, **kw, workers=2, exclude=[])
    fa, fb = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert fa.keys() == fb.keys() and any(k.endswith(".mp4") for k in fa) and len(fa) > 60
    assert [k for k in fa if fa[k] != fb[k]] == []
    meta = json.loads(one["meta"].read_text())
    assert meta["splits"]["train"]["drawn"] > 0 and meta["splits"]["train"]["examples"] == 40
    # another piece size, the same files
    monkeypatch.setattr(writer, "_CHUNK", 5)
    syn.write_dataset(tmp_path / "five", sizes, **kw, workers=2)
    assert _files(tmp_path / "five") == fa


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    paths = syn.write_dataset(d, {"train": 60, "val": {"single": 8, "multi": 4, "video": 4, "distractor": 4},
                                  "test": 20}, seed=0, video_frames=6, distractors=2, progress=False)
    return d, paths


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_format_and_paths(dataset):
    d, paths = dataset
    for split in syn.SPLITS:
        recs = _records(paths[split])
        assert len(recs) == {"train": 60, "val": 20, "test": 20}[split]
        for r in recs:
            assert set(r) == {"id", "task", "messages", "images", "videos", "answer"}
            user, assistant = r["messages"]
            assert user["role"] == "user" and assistant == {"role": "assistant", "content": r["answer"]}
            assert user["content"].count("<|image|>") == len(r["images"])
            assert user["content"].count("<|video|>") == len(r["videos"])
            assert len(r["images"]) + len(r["videos"]) >= 1
            for p in r["images"] + r["videos"]:
                assert (d / p).is_file(), p
            for p in r["images"]:
                assert Image.open(d / p).size == (S, S)
    meta = json.loads(paths["meta"].read_text())
    assert meta["splits"]["val"]["examples"] == 20 and meta["video_frames"] == 6
    assert "red" in meta["answer_vocab"] and meta["answer_vocab_size"] == len(meta["answer_vocab"])
    assert (d / "README.md").is_file()


def test_splits_never_share_an_image(dataset):
    d, paths = dataset
    hashes, pixels = {}, {}
    for split in syn.SPLITS:
        hashes[split] = {line.split("\t")[0] for line in (d / f"{split}.scenes.txt").read_text().splitlines()}
        pixels[split] = {hashlib.sha1(np.asarray(Image.open(d / p)).tobytes()).hexdigest()
                         for r in _records(paths[split]) for p in r["images"]}
    for x, y in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not hashes[x] & hashes[y]
        assert not pixels[x] & pixels[y]


def test_redraws_scenes_of_earlier_splits(tmp_path):
    # Excluding exactly the scenes this split would draw forces every example to be redrawn.
    first = list(syn.iter_examples("test", 12, 4, 4, 4, distractors=2, seed=5))
    used = set().union(*(e.scene_hashes() for e in first))
    again = list(syn.iter_examples("test", 12, 4, 4, 4, distractors=2, seed=5, exclude_hashes=used))
    assert [e.task for e in again] == [e.task for e in first]
    assert all(used.isdisjoint(e.scene_hashes()) for e in again)
    # generate_split reads an earlier split's hash file from the output folder
    (tmp_path / "train.scenes.txt").write_text("".join(f"{h}\tx\n" for h in sorted(used)))
    path = syn.generate_split(tmp_path, "test", 12, 4, 4, 4, distractors=2, seed=5, progress=False)
    written = {line.split("\t")[0] for line in (tmp_path / "test.scenes.txt").read_text().splitlines()}
    assert written and used.isdisjoint(written) and len(_records(path)) == 24


def test_mp4_decodes_to_the_frames(dataset):
    from hyperowl.processing.video import sample_frames

    d, paths = dataset
    recs = [r for r in _records(paths["val"]) if r["videos"]]
    by_id = {e.id: e for e in syn.iter_examples("val", 8, 4, 4, 4, seed=0, video_frames=6, distractors=2)}
    assert recs
    for r in recs:
        ex = by_id[r["id"]]
        (frames,) = ex.video_scenes
        with av.open(str(d / r["videos"][0])) as c:
            decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(decoded) == len(frames) == 6
        for scene, arr in zip(frames, decoded):
            assert arr.shape == (S, S, 3)
            for o in scene.objects:
                assert np.abs(arr[o.y, o.x].astype(int) - COLOURS[o.colour]).max() <= 30, (o, arr[o.y, o.x])
        sampled = sample_frames(d / r["videos"][0], max_frames=6)
        assert len(sampled) == 6
        assert np.abs(np.asarray(sampled[-1]).astype(int) - decoded[-1]).max() <= 2


def test_bad_arguments_fail_at_the_call():
    with pytest.raises(InputError, match="video frames"):
        syn.iter_examples("train", 1, video_frames=3)
    with pytest.raises(InputError, match="split"):
        syn.iter_examples("dev", 1)
    with pytest.raises(InputError, match="no multi task"):
        syn.iter_examples("train", 1, 1, tasks=["single"])


def test_write_dataset_removes_splits_not_asked_for(tmp_path):
    syn.write_dataset(tmp_path, {"train": 3, "val": 2, "test": 2}, progress=False)
    paths = syn.write_dataset(tmp_path, {"train": 3}, progress=False)
    assert set(paths) == {"train", "meta"}
    assert not (tmp_path / "val.jsonl").exists() and not (tmp_path / "val").exists()
    assert not (tmp_path / "test.scenes.txt").exists()


def test_examples_helper(tmp_path):
    written = syn.examples(tmp_path)
    assert [p.suffix for p in written] == [".png", ".png", ".png", ".mp4"]
    assert all(p.is_file() for p in written)
    assert len(json.loads((tmp_path / "examples.json").read_text())) == 4


def test_cli(tmp_path):
    out = tmp_path / "d"
    assert syn.synth_main(["--out", str(out), "--train", "8", "--val", "4", "--test", "4", "--frames", "4",
                           "--tasks", "single,video/direction"]) == 0
    recs = _records(out / "train.jsonl")
    assert len(recs) == 8 and all(r["task"].startswith(("single/", "video/direction")) for r in recs)
    assert {r["task"].split("/")[0] for r in recs} == {"single", "video"}  # the mix is shared by the kept groups
    # a second run replaces the generated splits
    assert syn.synth_main(["--out", str(out), "--train", "3", "--val", "0", "--test", "2", "--tasks", "single"]) == 0
    assert len(_records(out / "train.jsonl")) == 3 and len(list((out / "train" / "images").iterdir())) == 3
    bad = [["--train", "5"], ["--out", str(out), "--frames", "2"], ["--out", str(out), "--train", "-1"],
           ["--out", str(out), "--image-size", "20"], ["--out", str(out), "--tasks", "bogus"],
           ["--out", str(out), "--distractors", "0"], ["--out", str(out), "--nope"],
           ["--out", str(out), "--tasks", ","]]
    for argv in bad:
        with pytest.raises(InputError) as e:
            syn.synth_main(argv)
        assert "\n" not in str(e.value)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        syn.synth_main(["--out", str(f), "--train", "2", "--val", "0", "--test", "0"])
    user = tmp_path / "user"
    (user / "train").mkdir(parents=True)
    with pytest.raises(InputError, match="not a generated split"):
        syn.synth_main(["--out", str(user), "--train", "2", "--val", "0", "--test", "0"])


def test_extra_turns_answered_from_the_named_image():
    """`turns`: further questions about the images of a conversation, each checked by the oracle against the
    image it names; the first question is the same as without turns; videos get none."""
    plain = list(syn.iter_examples("train", 40, 20, 10, 30, seed=3))
    multi = list(syn.iter_examples("train", 40, 20, 10, 30, seed=3, turns=5))
    seen_tasks = set()
    for a, b in zip(plain, multi):
        assert a.messages == b.messages[:2] and not a.extra
        if b.task.startswith("video/"):
            assert not b.extra
            continue
        assert 2 <= len(b.extra) <= 4 and len(b.messages) == 2 + 2 * len(b.extra)
        group, sub = b.task.split("/")
        for task, q, ans in b.extra:
            seen_tasks.add(task)
            assert not (group == "single" and task == sub), "the first question asked again"
            if len(b.scenes) == 1:
                scene = b.scenes[0]
            else:
                (k,) = [int(m) for m in re.findall(r"\bimage (\d+)\b", q)]
                scene = b.scenes[k - 1]
            assert single_answer(task, q, scene) == ans, (q, ans)
    assert seen_tasks == set(syn.SINGLE_TASKS)
    with pytest.raises(InputError, match="turns"):
        syn.iter_examples("train", 1, 0, 0, 0, turns=0)


def test_video_turns_answered_from_the_named_frame(tmp_path):
    """`video_turns`: video conversations get further questions about their first or last frame, each checked
    by the oracle against that frame's scene; the video's own question is unchanged; images never get them.
    Only the train split gets them (meta says how many)."""
    plain = list(syn.iter_examples("train", 10, 10, 40, 10, seed=3, turns=2))
    more = list(syn.iter_examples("train", 10, 10, 40, 10, seed=3, turns=2, video_turns=4))
    ends = set()
    for a, b in zip(plain, more):
        if not b.task.startswith("video/"):
            assert a.messages == b.messages
            continue
        assert a.messages == b.messages[:2] and len(b.extra) == 3 and len(b.messages) == 8
        frames = b.video_scenes[0]
        for task, q, ans in b.extra:
            (end,) = [e for e in ("first", "last") if f"the {e} frame" in q]
            ends.add(end)
            assert single_answer(task, q, frames[0] if end == "first" else frames[-1]) == ans, (q, ans)
    assert ends == {"first", "last"}
    with pytest.raises(InputError, match="video_turns"):
        syn.iter_examples("train", 0, 0, 1, 0, video_turns=0)
    syn.synth_main(["--out", str(tmp_path), "--train", "20", "--val", "0", "--test", "10", "--seed", "2",
                    "--tasks", "video", "--video-turns", "3"])
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["train_video_turns"] == 3
    assert meta["splits"]["train"]["extra_turns"] == 40 and meta["splits"]["test"]["extra_turns"] == 0


def test_which_turns_name_an_object_of_exactly_the_answered_image(tmp_path):
    """`which_turns`: conversations of several images (multi-image, distractor; also when shown one image per
    turn) get up to K "which image has X?" turns; X (colour and kind) is in the answered image and in no
    other; targets are distinct images and spread over all indices; the other turns are those of the plain
    data, in some order; single-image and video conversations are untouched; only the train split gets them."""
    kw = dict(seed=4, turns=3, progressive=0.5)
    plain = list(syn.iter_examples("train", 20, 60, 10, 60, **kw))
    more = list(syn.iter_examples("train", 20, 60, 10, 60, which_turns=3, **kw))
    answered, n_which = set(), 0
    for a, b in zip(plain, more):
        if len(b.scenes) < 2:
            assert a.messages == b.messages
            continue
        assert b.messages[: len(b.messages) - 2 * len(b.extra)] == a.messages[: len(a.messages) - 2 * len(a.extra)]
        which = [(q, ans) for t, q, ans in b.extra if t == "which"]
        assert sorted(x for x in b.extra if x[0] != "which") == sorted(a.extra)
        assert len(which) <= 3 and len({ans for _, ans in which}) == len(which)
        for q, ans in which:
            (colour, kind) = re.search(r"\ban? (\w+) (\w+)\?$", q).groups()
            holders = [k + 1 for k, s in enumerate(b.scenes) if s.find(colour=colour, kind=kind)]
            assert holders == [int(ans.split()[1])], (q, ans, holders)
            assert len(b.scenes[holders[0] - 1].find(colour=colour, kind=kind)) == 1
            assert syn.phrase(colour, kind) not in b.prompt  # not the first question again
            answered.add(ans)
        n_which += len(which)
        if b.task.startswith("distractor/"):
            assert len(which) >= 2  # four random scenes nearly always have unique objects
    assert answered == {"image 1", "image 2", "image 3", "image 4"} and n_which > 150
    assert any(b.intro and any(t == "which" for t, _, _ in b.extra) for b in more)
    with pytest.raises(InputError, match="which_turns"):
        syn.iter_examples("train", 0, 1, 0, 0, which_turns=-1)
    syn.synth_main(["--out", str(tmp_path), "--train", "20", "--val", "0", "--test", "10", "--seed", "2",
                    "--tasks", "distractor", "--which-turns", "2"])
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["train_which_turns"] == 2
    assert meta["splits"]["train"]["which_turns"] >= 30 and meta["splits"]["test"]["which_turns"] == 0


def test_progressive_shows_images_one_per_turn_with_answers_from_that_image(tmp_path):
    """`progressive`: a share of multi-image conversations shows image k in turn k with a question about
    "this image" (checked by the oracle against image k), then the conversation's own question without the
    image list; images keep their order, the first question and answer are the same, videos and single
    images never change. Only the train split gets them."""
    plain = list(syn.iter_examples("train", 20, 40, 10, 40, seed=3, turns=3))
    prog = list(syn.iter_examples("train", 20, 40, 10, 40, seed=3, turns=3, progressive=0.5))
    shown = 0
    for a, b in zip(plain, prog):
        assert (a.prompt, a.answer, a.scenes) == (b.prompt, b.answer, b.scenes)
        if not b.intro:
            assert a.messages == b.messages
            continue
        shown += 1
        assert b.task.split("/")[0] in ("multi", "distractor") and not b.extra
        n = len(b.scenes)
        msgs = b.messages
        assert len(msgs) == 2 * n + 2 and len(b.intro) == n
        for k in range(n):
            q, ans = msgs[2 * k]["content"], msgs[2 * k + 1]["content"]
            assert q.startswith(f"Image {k + 1}: <|image|>\n") and q.count("<|image|>") == 1 and "this image" in q
            assert single_answer(b.intro[k][0], q, b.scenes[k]) == ans, (q, ans)
        assert msgs[-1]["content"] == b.answer and "<|image|>" not in msgs[-2]["content"]
        assert b.prompt.endswith(msgs[-2]["content"])
    assert 0.3 < shown / 80 < 0.7, shown
    with pytest.raises(InputError, match="progressive"):
        syn.iter_examples("train", 1, 0, 0, 0, progressive=1.5)
    syn.write_dataset(tmp_path, {"train": 40, "test": 20}, seed=2, train_progressive=1.0, tasks=["multi"],
                      progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["train_progressive"] == 1.0 and meta["splits"]["train"]["one_image_per_turn"] >= 30
    assert meta["splits"]["test"]["one_image_per_turn"] == 0
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").open()]
    intro = [r for r in train if len(r["messages"]) > 2]
    assert intro and all(len(r["images"]) == r["messages"][0]["content"].count("<|image|>") + sum(
        m["content"].count("<|image|>") for m in r["messages"][1:]) for r in intro)


def test_train_mix_weights_only_the_train_split(tmp_path):
    syn.synth_main(["--out", str(tmp_path), "--train", "40", "--val", "0", "--test", "20", "--seed", "2",
                    "--train-mix", "video=0.6,single=0"])
    meta = json.loads((tmp_path / "meta.json").read_text())
    groups = lambda split: {g: sum(n for t, n in meta["splits"][split]["tasks"].items() if t.startswith(g + "/"))
                            for g in syn.GROUPS}
    assert groups("train") == {"single": 0, "multi": 8, "video": 24, "distractor": 8}
    assert groups("test") == {"single": 8, "multi": 4, "video": 4, "distractor": 4}  # evaluation keeps DEFAULT_MIX
    assert meta["train_mix"] == {"single": 0, "multi": 0.2, "video": 0.6, "distractor": 0.2}
    for bad in ("video=x", "audio=0.3", "single=0,multi=0,video=0,distractor=0", "video=-1"):
        with pytest.raises(InputError, match="mix"):
            syn.synth_main(["--out", str(tmp_path / "bad"), "--train", "4", "--val", "0", "--test", "0",
                            "--train-mix", bad])
    assert not (tmp_path / "bad").exists()  # validated before anything is written


def test_train_turns_only_in_the_train_split(tmp_path):
    syn.write_dataset(tmp_path, {"train": 12, "test": 6}, seed=2, train_turns=3, tasks=["single"], progress=False)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").open()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").open()]
    assert all(len(r["messages"]) == 6 for r in train)  # single images always have 2 more answerable tasks
    assert all(len(r["messages"]) == 2 for r in test)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["train_turns"] == 3 and meta["splits"]["train"]["extra_turns"] == 24


def test_exclude_keeps_another_datasets_scenes_out(tmp_path):
    # Extra training data beside an existing dataset (e.g. video-only conversations for a training phase) must
    # not show an image of that dataset's test split. Same seed and tasks: without --exclude the new split
    # would be the old one, scene for scene.
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["--train", "0", "--val", "0", "--test", "6", "--frames", "4", "--tasks", "single,video/appear"]
    assert syn.synth_main(["--out", str(a), *argv]) == 0
    old = {line.split("\t")[0] for line in (a / "test.scenes.txt").read_text().splitlines()}
    assert syn.synth_main(["--out", str(b), *argv]) == 0
    assert {line.split("\t")[0] for line in (b / "test.scenes.txt").read_text().splitlines()} == old
    assert syn.synth_main(["--out", str(b), *argv, "--exclude", str(a / "test.scenes.txt")]) == 0
    new = {line.split("\t")[0] for line in (b / "test.scenes.txt").read_text().splitlines()}
    assert new and old.isdisjoint(new) and len(_records(b / "test.jsonl")) == 6
    assert json.loads((b / "meta.json").read_text())["exclude"] == [str(a / "test.scenes.txt")]
    with pytest.raises(InputError, match="no such file"):
        syn.synth_main(["--out", str(b), *argv, "--exclude", str(a / "val.scenes.txtx")])

"""Benchmark files in the layouts their authors publish (tests/data/formats, written by
scripts/make_format_samples.py): MMBench with its circular copies and VLMEvalKit prediction files, the same
as Parquet and as a `datasets` folder, Parquet for every task, Video-MME (Parquet, JSON records, its
results JSON), MVBench (its JSON, --video-dir, start/end segments), and LLaVA / ms-swift training data."""

import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from hyperowl.cli import main
from hyperowl.data import tables
from hyperowl.errors import InputError
from hyperowl.eval import harness, runner
from hyperowl.eval.tasks import mmbench_samples, strip_option_letters, video_mc_samples

FORMATS = Path(__file__).parent / "data" / "formats"
EVAL = Path(__file__).parent / "data" / "eval"
MMB = FORMATS / "MMBench_DEV_EN_sample.tsv"
MMB_PRED = FORMATS / "hyperowl_MMBench_DEV_EN_sample.tsv"
VMME = FORMATS / "videomme"
MVB = FORMATS / "mvbench"


class Answerer:
    """Stands in for chat_batch: for the questions it knows (question text -> right option text) it answers
    the letter that option has in this prompt; every other question gets "A". Counts model calls."""

    def __init__(self, truth):
        self.truth, self.calls, self.prompts = truth, 0, []

    def __call__(self, model, convs, **kw):
        self.calls += len(convs)
        outs = []
        for c in convs:
            text = c["messages"][0]["content"]
            self.prompts.append(text)
            q = next((q for q in self.truth if q in text), None)
            outs.append("A" if q is None else re.search(rf"\n([A-Z])\. {re.escape(self.truth[q])}\n", text).group(1))
        return outs


def rows(out):
    return [json.loads(l) for l in (Path(out) / "predictions.jsonl").read_text().splitlines()]


# -- MMBench as published -----------------------------------------------------------------------------------


def test_mmbench_circular_eval_groups_the_published_copies(monkeypatch, tmp_path):
    """3 questions (4, 3 and 2 options) in 9 rows; the answerer knows only question 1 and says "A" to the
    rest. CircularEval: question 1 right in all 4 copies; question 2's base row wants B; question 3's base
    row wants A (right) but its copy wants B -> 1 of 3 right, one call per row: 9 calls."""
    ans = Answerer({"What colour is the circle?": "red"})
    monkeypatch.setattr(runner, "chat_batch", ans)
    s = harness.run(None, harness.prepare("mmbench", str(MMB), tmp_path), tmp_path / "c")
    assert s["n"] == 3 and s["accuracy"] == pytest.approx(1 / 3) and ans.calls == 9
    rs = rows(tmp_path / "c")
    assert [r["id"] for r in rs] == ["1", "2", "3"] and [r["correct"] for r in rs] == [True, False, False]
    assert rs[0]["rows"] == ["1", "1000001", "2000001", "3000001"] and rs[2]["rows"] == ["3", "1000003"]
    # each call shows its row's own option order (copy 1 of question 1 starts with green), asked once
    q1 = [p for p in ans.prompts if "circle?" in p]
    assert [re.search(r"\nA\. (\w+)", p).group(1) for p in q1] == ["red", "green", "blue", "yellow"]
    assert len(q1) == len(set(q1)) == 4
    assert s["breakdown"]["l2-category"]["attribute_reasoning"] == {"n": 1, "accuracy": 0.0}
    # --no-circular: the base rows only, once each: question 1 right, 2 wrong ("A"), 3 right ("A") -> 2/3
    ans.calls = 0
    s = harness.run(None, harness.prepare("mmbench", str(MMB), tmp_path, circular=False), tmp_path / "plain")
    assert s["n"] == 3 and s["accuracy"] == pytest.approx(2 / 3) and ans.calls == 3
    assert [r["correct"] for r in rows(tmp_path / "plain")] == [True, False, True]


def test_mmbench_copies_borrow_the_base_image():
    samples = mmbench_samples(MMB)
    convs = samples[0].build()
    assert len(convs) == 4 and all(c["images"] == convs[0]["images"] for c in convs)
    assert Image.open(io.BytesIO(convs[0]["images"][0])).getpixel((16, 16)) == (220, 40, 40)  # the red circle


def test_mmbench_parquet_and_datasets_folder_read_like_the_tsv(monkeypatch, tmp_path):
    """lmms-lab's Parquet (image as a {"bytes", "path"} struct, int64 index, null cells) and a folder written
    by datasets' save_to_disk give the same questions, prompts and images as the TSV."""
    ref = mmbench_samples(MMB)
    for src in (FORMATS / "mmbench_dev_en.parquet", FORMATS / "mmbench_save_to_disk"):
        got = mmbench_samples(src)
        assert [x.id for x in got] == [x.id for x in ref] and [x.answer for x in got] == [x.answer for x in ref]
        for a, b in zip(got, ref):
            ca, cb = a.build(), b.build()
            assert [c["messages"] for c in ca] == [c["messages"] for c in cb]
            assert [c["images"] for c in ca] == [c["images"] for c in cb]
    ans = Answerer({"What colour is the circle?": "red"})
    monkeypatch.setattr(runner, "chat_batch", ans)
    s = harness.run(None, harness.prepare("mmbench", str(FORMATS / "mmbench_dev_en.parquet"), tmp_path), tmp_path)
    assert (s["n"], s["accuracy"], ans.calls) == (3, pytest.approx(1 / 3), 9)


def test_mmbench_prediction_file_is_scored_without_a_model(tmp_path, capsys):
    """VLMEvalKit's prediction file (no image column, a `prediction` column). Its answers, by hand: question
    1 right in all 4 rows ("A", "D", "(C)", "B. red"); question 2 right, right, wrong ("A" where C is
    right); question 3 wrong in its base row ("no"), right in its copy. CircularEval 1/3; base rows 2/3.
    No model is loaded (the --model given does not exist)."""
    argv = ["eval", "--task", "mmbench", "--data", str(MMB_PRED), "--model", str(tmp_path / "no-model")]
    assert main([*argv, "--out", str(tmp_path / "c")]) == 0
    s = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert s["n"] == 3 and s["accuracy"] == pytest.approx(1 / 3)
    assert [r["picked"] for r in rows(tmp_path / "c")][1] == ["B", "A", "A"]
    assert main([*argv, "--out", str(tmp_path / "p"), "--no-circular"]) == 0
    s = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert s["n"] == 3 and s["accuracy"] == pytest.approx(2 / 3)
    assert "all" in capsys.readouterr().out


def test_distractor_protocol_takes_the_base_rows_of_a_circular_file():
    from hyperowl.eval.tasks import load_mc_items

    for src in (MMB, FORMATS / "mmbench_dev_en.parquet", FORMATS / "mmbench_save_to_disk"):
        items = load_mc_items(src)
        assert [it.id for it in items] == ["1", "2", "3"] and isinstance(items[0].image, bytes)


# -- Parquet and datasets input for every task --------------------------------------------------------------


def _parquet(path, recs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(k for r in recs for k in r))  # every column (from_pylist reads the first row's)
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in recs]), path)
    return path


def test_parquet_for_every_task(monkeypatch, tmp_path):
    """Every --task reads Parquet (was a raw UnicodeDecodeError); image cells may be {"bytes", "path"}
    structs (as lmms-lab's sets ship them). Same samples as the JSON(L) originals."""
    import shutil

    for sub in ("images", "videos"):
        shutil.copytree(EVAL / sub, tmp_path / sub)
    jl = lambda name: [json.loads(l) for l in (EVAL / name).read_text().splitlines() if l.strip()]
    vqa = jl("vqa.jsonl")
    for r in vqa:  # the image embedded, as lmms-lab's VQAv2 Parquet has it
        r["image"] = {"bytes": (EVAL / r["image"]).read_bytes(), "path": Path(r["image"]).name}
        r["answers"] = [a["answer"] if isinstance(a, dict) else a for a in r["answers"]]
    data = {"vqa": _parquet(tmp_path / "vqa.parquet", vqa),
            "multi-image": _parquet(tmp_path / "mi.parquet", [dict(r, label=None if r.get("label") is None else str(r["label"]))
                                                            for r in jl("multi_image.jsonl")]),
            "video-mc": _parquet(tmp_path / "v.parquet", [dict(r, answer=str(r["answer"])) for r in json.loads((EVAL / "video_mc.json").read_text())
                                                          if "video" in r]),
            "mmbench": FORMATS / "mmbench_dev_en.parquet",
            "exact": _parquet(tmp_path / "exact.parquet", [
                {"id": "e1", "task": "colour", "images": ["images/red_circle.png"], "answer": "red",
                 "messages": [{"role": "user", "content": "<|image|>Colour?"}]}])}
    monkeypatch.setattr(runner, "chat_batch", lambda m, convs, **k: ["red"] * len(convs))
    for task, path in data.items():
        plan = harness.prepare(task, str(path), tmp_path / task, frames=2)
        assert plan.samples, task
        s = harness.run(None, plan, tmp_path / task)
        assert s["n"] == len(plan.samples) >= 1, task
    vq = harness.prepare("vqa", str(data["vqa"]), tmp_path).samples
    conv = vq[0].build()[0]
    assert conv["images"][0] == (EVAL / "images" / "red_circle.png").read_bytes()
    assert [x.answer for x in vq] == [x.answer for x in harness.prepare("vqa", str(EVAL / "vqa.jsonl"), tmp_path).samples]
    assert json.loads((tmp_path / "exact" / "summary.json").read_text())["accuracy"] == 1.0


def test_datasets_folders_and_hub_ids(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"a": 1}, {"a": 2}])
    datasets.DatasetDict({"dev": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=r"a DatasetDict with splits dev, test; give one split's folder"):
        tables.read_rows(tmp_path / "dd")
    assert [r for _, r in tables.read_rows(tmp_path / "dd" / "test")] == [{"a": 1}, {"a": 2}]
    # a downloaded hub snapshot: Parquet shards under the folder
    assert len(tables.read_rows(VMME / "videomme")) == 3
    asked = []

    def load_dataset(name, split=None):  # no network here: the library's loader answers from memory
        asked.append((name, split))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    got = tables.read_rows("hf:someone/set:test")
    assert asked == [("someone/set", "test")] and [r for _, r in got] == [{"a": 1}, {"a": 2}]
    assert got[1][0] == "hf:someone/set:test#row 1"
    with pytest.raises(InputError, match="no such file"):
        tables.read_rows(tmp_path / "empty-name")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a datasets save_to_disk layout"):
        tables.read_rows(tmp_path / "empty")


# -- Video-MME ------------------------------------------------------------------------------------------------


def test_video_mme_parquet_end_to_end(monkeypatch, tmp_path, capsys):
    """Video-MME's Parquet with its videos in data/<videoID>.mp4 next to the videomme/ folder: options shown
    once ("A. left.", not "A. A. left."), categories domain/sub_category, accuracy by duration and task."""
    pq = VMME / "videomme" / "test-00000-of-00001.parquet"
    truth = {"Which way does the circle move?": "right.", "What colour is the moving object?": "red.",
             "Which way does the square move?": "left."}  # the last is wrong (the square moves down)
    ans = Answerer(truth)
    monkeypatch.setattr(runner, "chat_batch", ans)
    plan = harness.prepare("video-mc", str(pq), tmp_path, frames=3)
    assert [x.id for x in plan.samples] == ["001-1", "001-2", "002-1"]
    conv = plan.samples[0].build()[0]
    assert "\nA. left.\nB. right.\nC. up.\nD. down.\n" in conv["messages"][0]["content"]
    assert "A. A." not in conv["messages"][0]["content"] and len(conv["videos"][0]) == 3
    s = harness.run(None, plan, tmp_path / "o")
    assert s["accuracy"] == pytest.approx(2 / 3)
    assert set(s["categories"]) == {"Knowledge/Astronomy", "Life Record/Pet & Animal"}
    assert s["breakdown"]["duration"] == {"medium": {"n": 1, "accuracy": 0.0}, "short": {"n": 2, "accuracy": 1.0}}
    assert s["breakdown"]["task_type"]["Action Recognition"] == {"n": 2, "accuracy": 0.5}
    # the JSON records (the same rows, flat) give the same samples; the folder of shards too
    for other in (VMME / "videomme.json", VMME / "videomme"):
        got = harness.prepare("video-mc", str(other), tmp_path, frames=3).samples
        assert [(x.id, x.category, x.answer, x.extra) for x in got] == [(x.id, x.category, x.answer, x.extra)
                                                                        for x in plan.samples]
    # through the CLI the duration table is printed
    monkeypatch.setattr("hyperowl.load", lambda *a, **k: type("M", (), {"processor": object()})())
    assert main(["eval", "--task", "video-mc", "--data", str(pq), "--out", str(tmp_path / "cli"), "--frames", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^duration\s+n\s+accuracy$", out, re.M) and re.search(r"^short\s+2\s+1\.000$", out, re.M)


def test_video_mme_results_json_is_scored_from_its_responses(tmp_path):
    """The official per-video results form (questions with a `response`): "B" right, "The answer is A." wrong
    (C is right), "(D) down" right -> 2/3; short 1/2, medium 1/1. No model is loaded."""
    assert main(["eval", "--task", "video-mc", "--data", str(VMME / "videomme_results.json"), "--out", str(tmp_path),
                 "--model", str(tmp_path / "no-model")]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["n"] == 3 and s["accuracy"] == pytest.approx(2 / 3)
    assert s["breakdown"]["duration"] == {"medium": {"n": 1, "accuracy": 1.0}, "short": {"n": 2, "accuracy": 0.5}}


def test_video_mme_missing_videos_name_the_fix(tmp_path):
    import shutil

    shutil.copy(VMME / "videomme.json", tmp_path / "v.json")
    with pytest.raises(InputError, match=r"video 'fFjv93ACGo8' not found .*--video-dir"):
        video_mc_samples(tmp_path / "v.json")
    assert len(video_mc_samples(tmp_path / "v.json", video_dir=VMME / "data")) == 3


def test_strip_option_letters():
    assert strip_option_letters(["A. down.", "B. up."]) == ["down.", "up."]
    assert strip_option_letters(["(A) u", "(B) v"]) == ["u", "v"]
    assert strip_option_letters(["A cat", "B. dog"]) == ["A cat", "B. dog"]  # not every option lettered
    assert strip_option_letters(["B. x", "A. y"]) == ["B. x", "A. y"]  # letters out of order: text, kept


# -- MVBench --------------------------------------------------------------------------------------------------


def _colour(frame):
    return frame.getpixel((16, 16))


def test_mvbench_layout_video_dir_and_segments(monkeypatch, tmp_path):
    """MVBench's task JSON (video, candidates, answer text, start/end) with the videos in their own tree:
    --video-dir finds them; the task is the file's name; frames come from the [start, end] clip only (the
    test video is red for 1 s, then blue)."""
    data = MVB / "json" / "action_sequence.json"
    with pytest.raises(InputError, match=r"video 'R2D2A.mp4' not found.*--video-dir"):
        harness.prepare("video-mc", str(data), tmp_path)
    vdir = MVB / "video" / "star" / "Charades_v1_480"
    plan = harness.prepare("video-mc", str(data), tmp_path, frames=4, video_dir=str(vdir))
    s0, s1 = plan.samples
    assert (s0.category, s0.answer, s1.answer) == ("action_sequence", "B", "B") and s0.extra["segment"] == [1.0, 2.0]
    clip = s0.build()[0]["videos"][0]
    assert len(clip) == 4 and all(_colour(f)[2] > 150 and _colour(f)[0] < 100 for f in clip)  # all blue
    # the same record without its segment samples the whole video: red first
    rec = dict(json.loads(data.read_text())[0])
    del rec["start"], rec["end"]
    (tmp_path / "whole.json").write_text(json.dumps([rec]))
    whole = video_mc_samples(tmp_path / "whole.json", max_frames=4, video_dir=vdir)[0].build()[0]["videos"][0]
    assert _colour(whole[0])[0] > 150 and _colour(whole[-1])[2] > 150
    ans = Answerer({"What is shown in this part": "A blue square.", "Which way does the circle": "Right."})
    monkeypatch.setattr(runner, "chat_batch", ans)
    assert harness.run(None, plan, tmp_path / "o")["accuracy"] == 1.0
    # a task whose "video" is a folder of frames
    import shutil

    (tmp_path / "frames" / "clip1").mkdir(parents=True)
    for i, name in enumerate(("red_circle", "red_square", "blue_circle")):
        shutil.copy(EVAL / "images" / f"{name}.png", tmp_path / "frames" / "clip1" / f"{i:05d}.png")
    (tmp_path / "fp.json").write_text(json.dumps([dict(rec, video="clip1")]))
    fr = video_mc_samples(tmp_path / "fp.json", max_frames=2, video_dir=tmp_path / "frames")[0].build()[0]["videos"][0]
    assert len(fr) == 2 and _colour(fr[0])[0] > 150 and _colour(fr[1])[2] > 150  # first and last frame
    bad = dict(rec, start=3, end=1)
    (tmp_path / "bad.json").write_text(json.dumps([bad]))
    with pytest.raises(InputError, match=r"bad.json\[0\]: segment start 3.0 / end 1.0"):
        video_mc_samples(tmp_path / "bad.json", video_dir=vdir)
    with pytest.raises(InputError, match="--video-dir is for --task video-mc"):
        harness.prepare("vqa", str(EVAL / "vqa.jsonl"), tmp_path, video_dir=str(vdir))


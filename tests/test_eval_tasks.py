"""Benchmark harness: scorers on hand-worked cases, every task format end to end on a tiny model, the
distractor protocol, synthetic sets, resume and input errors. Data: tests/data/eval (make_samples.py)."""

import base64
import json
import re
import shutil
from pathlib import Path

import pytest

import hyperowl
from hyperowl.cli import main
from hyperowl.errors import InputError
from hyperowl.eval import harness, runner
from hyperowl.eval import distractor as dis
from hyperowl.eval.tasks import (load_mmbench_items, mmbench_samples, multi_image_samples, parse_choice,
                                 parse_yes_no, rotate, video_mc_samples, vqa_normalize, vqa_samples,
                                 vqa_soft_accuracy)

DATA = Path(__file__).parent / "data" / "eval"


@pytest.fixture(scope="module")
def model(chat_checkpoint):
    return hyperowl.load(chat_checkpoint)


# -- scorers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("The red car.", "red car"), ("dont", "don't"), ("1,000", "1000"), ("yes!", "yes"),
    ("3.5", "3.5"), ("hello-world", "hello world"), ("a dog's toy", "dog's toy"), ("  Ten\tapples ", "10 apples"),
    ("Red.", "red"), ("an apple (green)", "apple green"), ("2.", "2"), ("It is 2.5 m.", "it is 2.5 m"),
])
def test_vqa_normalize(raw, norm):
    assert vqa_normalize(raw) == norm


def test_vqa_soft_accuracy_hand_worked():
    other = ["blue"] * 10
    # k annotators said "red": those k see k-1 others agree, the 10-k others see k; min(1, ./3), averaged
    assert vqa_soft_accuracy("red", ["red"] + other[:9]) == pytest.approx(0.3)   # (0 + 9 * 1/3) / 10
    assert vqa_soft_accuracy("red", ["red"] * 2 + other[:8]) == pytest.approx(0.6)   # (2/3*2 + 8*2/3) / 10
    assert vqa_soft_accuracy("red", ["red"] * 3 + other[:7]) == pytest.approx(0.9)   # (3*2/3 + 7) / 10
    assert vqa_soft_accuracy("red", ["red"] * 4 + other[:6]) == pytest.approx(1.0)
    assert vqa_soft_accuracy("green", ["red"] * 4 + other[:6]) == 0.0
    # normalization on both sides: "Two." == "2", "the Red" == "red"
    assert vqa_soft_accuracy("Two.", ["2", "2", "2", "two", "3", "3", "3", "3", "3", "3"]) == pytest.approx(1.0)
    assert vqa_soft_accuracy("the Red", ["red"] * 3 + other[:7]) == pytest.approx(0.9)
    assert vqa_soft_accuracy("red", ["Red"]) == 1.0  # a single reference answer: exact match


def test_parse_choice_and_yes_no():
    opts = ["red", "green", "blue", "yellow"]
    assert parse_choice("B", opts) == 1
    assert parse_choice("(C) blue", opts) == 2
    assert parse_choice("Answer: D", opts) == 3
    assert parse_choice("The answer is B.", opts) == 1
    assert parse_choice("I think C is right", opts) == 2
    assert parse_choice("green", opts) == 1           # option text
    assert parse_choice("It is yellow.", opts) == 3   # option text inside the answer
    assert parse_choice("A red circle", ["blue circle", "red circle"]) == 1  # "A" here is an article
    assert parse_choice("A", ["x", "y"]) == 0 and parse_choice("A. x", ["x", "y"]) == 0
    assert parse_choice("dark red", ["red", "dark red"]) == 1   # the longest contained option wins
    assert parse_choice("b", opts) == 1 and parse_choice("(c).", opts) == 2
    assert parse_choice("E", opts) is None and parse_choice("purple", opts) is None
    assert parse_yes_no("Yes, it is.") is True and parse_yes_no("no") is False and parse_yes_no("False.") is False
    assert parse_yes_no("maybe") is None


def test_rotation_and_circular_scoring():
    assert rotate(["a", "b", "c", "d"], 1, 1) == (["b", "c", "d", "a"], 0)
    assert rotate(["a", "b", "c", "d"], 1, 2) == (["c", "d", "a", "b"], 3)
    assert rotate(["a", "b", "c"], 0, 4) == (["b", "c", "a"], 2)
    s = mmbench_samples(DATA / "mmbench.tsv")[0]  # "What colour is the circle?" A red, answer A, 4 options
    convs = s.build()
    assert len(convs) == 4
    firsts = [re.search(r"\nA\. (\w+)", c["messages"][0]["content"]).group(1) for c in convs]
    assert firsts == ["red", "green", "blue", "yellow"]
    assert convs[0]["messages"][0]["content"] == ("<|image|>What colour is the circle?\nA. red\nB. green\nC. blue\n"
                                                  "D. yellow\nAnswer with the option's letter from the given choices directly.")
    assert s.score(["A", "D", "C", "B"])["correct"] is True   # red is A, then D, C, B as it rotates
    assert s.score(["A", "D", "C", "red"])["score"] == 1.0    # option text counts too
    assert s.score(["A", "A", "A", "A"])["correct"] is False  # always "A" fails the circular test
    assert s.score(["A", "D", "C", "C"])["score"] == 0.0


# -- end to end on a tiny model ---------------------------------------------------------------------------


def rows(out):
    return [json.loads(l) for l in (Path(out) / "predictions.jsonl").read_text().splitlines()]


def test_mmbench_end_to_end(model, tmp_path):
    plan = harness.prepare("mmbench", str(DATA / "mmbench.tsv"), tmp_path)
    s = harness.run(model, plan, tmp_path, batch_size=4, max_new_tokens=3)
    rs = rows(tmp_path)
    assert [r["id"] for r in rs] == ["1", "2", "3"]
    assert [len(r["prediction"]) for r in rs] == [4, 3, 2]  # k rotations for k options (row 3 borrows row 1's image)
    for r in rs:  # the stored score is what the scorer says about the stored raw outputs
        s1 = [x for x in mmbench_samples(DATA / "mmbench.tsv") if x.id == r["id"]][0]
        assert s1.score(r["prediction"])["score"] == r["score"]
    assert s["accuracy"] == pytest.approx(sum(r["score"] for r in rs) / 3)
    assert set(s["categories"]) == {"colour", "shape"} and s["categories"]["shape"]["n"] == 2
    assert json.loads((tmp_path / "summary.json").read_text())["n"] == 3


def test_vqa_multi_image_video_end_to_end(model, tmp_path):
    for task, name in [("vqa", "vqa.jsonl"), ("multi-image", "multi_image.jsonl"), ("video-mc", "video_mc.json")]:
        out = tmp_path / task
        s = harness.run(model, harness.prepare(task, str(DATA / name), out, frames=4), out, max_new_tokens=3)
        rs = rows(out)
        assert s["n"] == len(rs) == 3 and all(isinstance(r["prediction"], str) for r in rs)
        assert s["accuracy"] == pytest.approx(sum(r["score"] for r in rs) / 3)
    vq = rows(tmp_path / "vqa")
    assert [r["id"] for r in vq] == ["101", "102", "103"]
    for r in vq:
        assert r["score"] == pytest.approx(vqa_soft_accuracy(r["prediction"], r["answer"]))
    assert vq[1]["answer"][:2] == ["one", "one"]  # {"answer": ...} objects read
    assert json.loads((tmp_path / "video-mc" / "summary.json").read_text())["categories"]["direction"]["n"] == 1


class Oracle:
    """Stands in for chat_batch: answers from the prompt alone, with the letter of the option that `truth`
    names (truth: question text -> right option text), so the whole pipeline can be checked at 100%."""

    def __init__(self, truth, check=None):
        self.truth, self.check, self.calls = truth, check, 0

    def __call__(self, model, convs, **kw):
        self.calls += len(convs)
        outs = []
        for c in convs:
            text = c["messages"][0]["content"]
            if self.check:
                self.check(c)
            q = next(q for q in self.truth if q in text)
            letter = re.search(rf"\n([A-Z])\. {re.escape(self.truth[q])}\n", text).group(1)
            outs.append(letter)
        return outs


def test_pipeline_scores_right_answers_as_right(monkeypatch, tmp_path):
    truth = {"What colour is the circle?": "red", "What shape is shown?": "square", "Is the object round?": "yes"}
    monkeypatch.setattr(runner, "chat_batch", Oracle(truth))
    s = runner.run_samples(None, mmbench_samples(DATA / "mmbench.tsv"), tmp_path / "a")
    assert s["accuracy"] == 1.0
    monkeypatch.setattr(runner, "chat_batch", lambda m, convs, **k: ["A"] * len(convs))
    assert runner.run_samples(None, mmbench_samples(DATA / "mmbench.tsv"), tmp_path / "b")["accuracy"] == 0.0
    # video-mc and the multi-image choice question, single pass; NLVR2 yes/no
    truth = {"Which way does": "right", "What colour is the moving": "red", "What is red": "the object",
             "Which image shows a square?": "the second"}
    monkeypatch.setattr(runner, "chat_batch", Oracle(truth))
    assert runner.run_samples(None, video_mc_samples(DATA / "video_mc.json", 4), tmp_path / "c")["accuracy"] == 1.0
    mc = [x for x in multi_image_samples(DATA / "multi_image.jsonl") if x.id == "mc-0"]
    conv = mc[0].build()[0]
    assert conv["messages"][0]["content"].startswith("<|image|> <|image|> <|image|> Which image")
    assert runner.run_samples(None, mc, tmp_path / "d")["accuracy"] == 1.0
    yn = [x for x in multi_image_samples(DATA / "multi_image.jsonl") if x.id != "mc-0"]
    assert yn[0].build()[0]["messages"][0]["content"].startswith("Image 1: <|image|>\nImage 2: <|image|>\nIs this")
    assert [x.score([a])["correct"] for x, a in zip(yn, ["Yes.", "no"])] == [True, True]
    assert [x.score([a])["correct"] for x, a in zip(yn, ["no", "yes"])] == [False, False]


def test_video_frames_are_sampled(monkeypatch):
    s = video_mc_samples(DATA / "video_mc.json", max_frames=3)
    assert [len(x.build()[0]["videos"][0]) for x in s] == [3, 4, 2]  # --frames, the record's frames, a frame list


def test_resume_skips_done_samples_and_trusts_rows(monkeypatch, tmp_path):
    truth = {"What colour is the circle?": "red", "What shape is shown?": "square", "Is the object round?": "yes"}
    oracle = Oracle(truth)
    monkeypatch.setattr(runner, "chat_batch", oracle)
    samples = mmbench_samples(DATA / "mmbench.tsv")
    runner.run_samples(None, samples[:2], tmp_path)   # interrupted after two samples
    assert oracle.calls == 4 + 3
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    fake = dict(json.loads(lines[0]), score=0.0, correct=False)  # a row on disk is trusted, not recomputed
    (tmp_path / "predictions.jsonl").write_text(json.dumps(fake) + "\n" + lines[1] + "\n" + '{"id": "3", "categ')
    s = runner.run_samples(None, samples, tmp_path)  # the cut last line is dropped and recomputed
    assert oracle.calls == 4 + 3 + 2
    assert [r["id"] for r in rows(tmp_path)] == ["1", "2", "3"]
    assert s["accuracy"] == pytest.approx(2 / 3) and s["computed"] == 1
    again = runner.run_samples(None, samples, tmp_path)
    assert oracle.calls == 9 and again["computed"] == 0 and again["accuracy"] == s["accuracy"]
    # rows of another task or data file are never taken for this one's
    runner.run_samples(None, samples, tmp_path / "tagged", meta={"task": "mmbench", "data": "a/mmbench.tsv"})
    runner.run_samples(None, samples, tmp_path / "tagged", meta={"task": "mmbench", "data": "b/mmbench.tsv"})
    with pytest.raises(InputError, match="holds a run of .*'task': 'mmbench'.*choose another --out"):
        runner.run_samples(None, samples, tmp_path / "tagged", meta={"task": "vqa", "data": "vqa.jsonl"})


def test_exact_task_is_the_default(chat_checkpoint, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    shutil.copy(DATA / "images" / "red_circle.png", tmp_path / "r.png")
    data.write_text(json.dumps({"id": "x", "task": "single/colour", "images": ["r.png"], "answer": "red",
                                "messages": [{"role": "user", "content": "<|image|>Colour?"}]}) + "\n")
    assert main(["eval", "--model", str(chat_checkpoint), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--max-new-tokens", "2"]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["task"] == "exact" and s["tasks"]["single/colour"]["n"] == 1 and "single" in capsys.readouterr().out


# -- distractor protocol ----------------------------------------------------------------------------------


def test_distractor_variants_are_seeded_and_reference_the_right_image():
    items = harness.prepare("distractor", str(DATA / "distractor_mc.jsonl"), "unused", pool=str(DATA / "pool")).items
    pool = dis.load_pool(DATA / "pool")
    assert len(pool) == 6
    s = dis.distractor_samples(items, pool, 3, seed=1)
    convs = s[0].build()
    assert len(convs) == 4
    orders = set()
    for c, k in zip(convs, s[0].extra["target_image"]):
        text = c["messages"][0]["content"]
        assert len(c["images"]) == 4 and text.count("<|image|>") == 4 and f"Look at image {k}. What colour" in text
        assert c["images"][k - 1] == items[0].image and all(p in pool for i, p in enumerate(c["images"]) if i != k - 1)
        orders.add(tuple(re.findall(r"\n[A-D]\. (\w+)", text)))
    assert len(orders) == 4  # every variant has its own option order
    assert [c["images"] for c in dis.distractor_samples(items, pool, 3, seed=1)[0].build()] == [c["images"] for c in convs]
    assert [c["images"] for c in dis.distractor_samples(items, pool, 3, seed=2)[0].build()] != [c["images"] for c in convs]
    plain = dis.distractor_samples(items, pool, 0)[0].build()[0]
    assert plain["messages"][0]["content"].startswith("<|image|>What colour") and len(plain["images"]) == 1
    open_ = dis.distractor_samples(items, pool, 3, seed=1, style="open")[0]
    texts = [c["messages"][0]["content"] for c in open_.build()]
    assert texts[0].endswith(f"Look at image {open_.extra['target_image'][0]}. What colour is the circle?")
    assert not any("A. " in t for t in texts) and open_.score(["red", "Red.", "red", "it is red"])["correct"] is True
    assert open_.score(["red", "red", "blue", "red"])["correct"] is False
    with pytest.raises(InputError, match="prompt style 'x'"):
        dis.distractor_samples(items, pool, 3, style="x")
    with pytest.raises(InputError, match="fewer than 7 distractors"):
        dis.distractor_samples(items, pool, 7)
    assert dis.parse_counts("10,0,5") == [0, 5, 10]
    with pytest.raises(InputError, match="--distractors"):
        dis.parse_counts("1,x")


def test_distractor_sweep_oracle_and_tiny_model(chat_checkpoint, monkeypatch, tmp_path, capsys):
    items = harness.prepare("distractor", str(DATA / "distractor_mc.jsonl"), "unused", pool=str(DATA / "pool")).items
    pool = dis.load_pool(DATA / "pool")

    def check(conv):  # the referenced image is the question's own
        m = re.search(r"Look at image (\d+)\.", conv["messages"][0]["content"])
        k = int(m.group(1)) if m else 1
        assert Path(conv["images"][k - 1]).name in ("red_circle.png", "green_square.png")

    oracle = Oracle({"What colour": "red", "What shape": "square"}, check)
    monkeypatch.setattr(runner, "chat_batch", oracle)
    rep = dis.run_distractor(None, items, pool, [0, 2], tmp_path / "oracle", plot=False)
    assert [r["accuracy"] for r in rep["results"]] == [1.0, 1.0] and oracle.calls == 2 * 2 * 4
    monkeypatch.undo()
    # the tiny model, through the CLI: table, JSON, PNG, per-N folders
    out = tmp_path / "cli"
    assert main(["eval", "--task", "distractor", "--model", str(chat_checkpoint), "--data",
                 str(DATA / "distractor_mc.jsonl"), "--pool", str(DATA / "pool"), "--distractors", "0,2",
                 "--out", str(out), "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr().out
    assert "peak RSS MiB" in printed and re.search(r"^\s+2\s+2\s+\d\.\d{3}", printed, re.M)
    rep = json.loads((out / "distractor.json").read_text())
    assert [r["distractors"] for r in rep["results"]] == [0, 2]
    for r in rep["results"]:
        rs = rows(out / f"N{r['distractors']}")
        assert r["accuracy"] == pytest.approx(sum(x["score"] for x in rs) / 2)
        assert all(len(x["prediction"]) == 4 for x in rs) and r["peak_rss_mib"] > 0 and r["latency_s"] > 0
    assert (out / "distractor.png").read_bytes()[:4] == b"\x89PNG"


# -- synthetic sets ---------------------------------------------------------------------------------------


def test_synthetic_sets_generated_cached_and_evaluated(model, tmp_path):
    from hyperowl.data.synthetic import iter_examples
    from hyperowl.eval.synthetic_tasks import MC_TASKS

    plan = harness.prepare("synthetic-single", None, tmp_path, limit=3)
    assert len(plan.samples) == 3 and all(s.category.startswith("single/") for s in plan.samples)
    stamp = plan.data.stat().st_mtime_ns
    assert harness.prepare("synthetic-single", None, tmp_path, limit=3).data.stat().st_mtime_ns == stamp  # cached
    s = harness.run(model, plan, tmp_path / "single", max_new_tokens=2)
    assert s["n"] == 3 and set(s["groups"]) == {"single"}
    vplan = harness.prepare("synthetic-video", None, tmp_path, limit=2)
    assert all(len(s.build()[0]["videos"]) == 1 for s in vplan.samples)
    assert harness.run(model, vplan, tmp_path / "video", max_new_tokens=2)["n"] == 2
    dplan = harness.prepare("synthetic-distractor", None, tmp_path, limit=4, distractors="0,1")
    assert len(dplan.items) == 4 and len(dplan.pool) == 20 and dplan.counts == [0, 1]
    truth = list(iter_examples("test", n_single=4, seed=0, tasks=list(MC_TASKS)))
    for it, ex in zip(dplan.items, truth):
        assert it.options[it.answer] == ex.answer and len(set(it.options)) == len(it.options) >= 2
    rep = harness.run(model, dplan, tmp_path / "dis", max_new_tokens=2)
    assert [r["n"] for r in rep["results"]] == [4, 4]


# -- input errors -----------------------------------------------------------------------------------------


def _tsv(tmp_path, edit):
    text = (DATA / "mmbench.tsv").read_text()
    p = tmp_path / "bad.tsv"
    p.write_text(edit(text))
    return p


def test_bad_input_gives_clear_errors(tmp_path):
    lines = lambda t: t.splitlines(keepends=True)
    no_answer = _tsv(tmp_path, lambda t: "".join(
        "\t".join(c for i, c in enumerate(l.rstrip("\n").split("\t")) if i != 7) + "\n" for l in lines(t)))
    with pytest.raises(InputError, match=r"bad.tsv: column 'answer' missing \(MMBench test splits have no answers"):
        load_mmbench_items(no_answer)
    row1 = lines((DATA / "mmbench.tsv").read_text())[1].split("\t")
    bad64 = _tsv(tmp_path, lambda t: t.replace(row1[8], "not*base64!"))
    with pytest.raises(InputError, match=r"bad.tsv:2 \(index 1\): column 'image' is not valid base64"):
        load_mmbench_items(bad64)
    not_image = _tsv(tmp_path, lambda t: t.replace(row1[8], base64.b64encode(b"hello, not a png").decode()))
    with pytest.raises(InputError, match="decodes to no readable image"):
        load_mmbench_items(not_image)
    bad_letter = _tsv(tmp_path, lambda t: t.replace("\tA\t" + row1[8], "\tE\t" + row1[8]))
    with pytest.raises(InputError, match="answer 'E' is not one of the option letters A, B, C, D"):
        load_mmbench_items(bad_letter)

    def jsonl(name, recs):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return p

    shutil.copy(DATA / "images" / "red_circle.png", tmp_path / "r.png")
    with pytest.raises(InputError, match=r"v.jsonl:1: image 'nope.png' not found"):
        vqa_samples(jsonl("v.jsonl", [{"question": "q", "image": "nope.png", "answers": ["a"]}]))
    with pytest.raises(InputError, match=r"v.jsonl:1: missing field 'answers'"):
        vqa_samples(jsonl("v.jsonl", [{"question": "q", "image": "r.png"}]))
    with pytest.raises(InputError, match=r"m.jsonl:1: video 'gone.mp4' not found"):
        video_mc_samples(jsonl("m.jsonl", [{"video": "gone.mp4", "question": "q", "options": ["a", "b"], "answer": 0}]))
    with pytest.raises(InputError, match="answer index 5 out of range for 2 options"):
        video_mc_samples(jsonl("m.jsonl", [{"frames": ["r.png"], "question": "q", "options": ["a", "b"], "answer": 5}]))
    with pytest.raises(InputError, match="label 'maybe' must be true/false"):
        multi_image_samples(jsonl("n.jsonl", [{"images": ["r.png"], "sentence": "s", "label": "maybe"}]))
    (tmp_path / "broken.jsonl").write_text('{"question": \n')
    with pytest.raises(InputError, match=r"broken.jsonl:1: not valid JSON"):
        vqa_samples(tmp_path / "broken.jsonl")
    with pytest.raises(InputError, match="--data 'missing.jsonl': no such file"):
        harness.prepare("vqa", "missing.jsonl", tmp_path)
    with pytest.raises(InputError, match="--pool 'nowhere': no such folder"):
        harness.prepare("distractor", str(DATA / "distractor_mc.jsonl"), tmp_path, pool="nowhere")
    with pytest.raises(InputError, match="sample id '1' appears twice"):
        runner.run_samples(None, mmbench_samples(DATA / "mmbench.tsv")[:1] * 2, tmp_path / "dup")


def test_cli_input_errors_are_one_line(tmp_path, capsys):
    for argv, msg in [(["--task", "vqa"], "--task vqa needs --data FILE"),
                      (["--task", "nope", "--data", "x"], "--task 'nope': choose one of"),
                      (["--task", "distractor", "--data", str(DATA / "distractor_mc.jsonl")], "needs --pool"),
                      (["--task", "mmbench", "--data", str(DATA / "vqa.jsonl")], "column 'index' missing"),
                      (["--task", "synthetic-single", "--data", "x"], "drop --data")]:
        assert main(["eval", "--out", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hyperowl: error:") and msg in err and "\n" not in err


# -- data parallel ----------------------------------------------------------------------------------------


def test_data_parallel_ranks_split_then_rank0_merges(monkeypatch, tmp_path):
    """Two ranks as two threads (a threading barrier for gloo's): each computes only samples r::2."""
    import threading

    local = threading.local()
    barrier = threading.Barrier(2, timeout=60)
    monkeypatch.setattr(runner, "dist_info", lambda: (local.rank, 2))
    monkeypatch.setattr(runner, "_barrier", barrier.wait)
    seen = {0: [], 1: []}

    def fake_chat(model, convs, **kw):
        seen[local.rank] += [c["messages"][0]["content"] for c in convs]
        return ["B"] * len(convs)

    monkeypatch.setattr(runner, "chat_batch", fake_chat)
    samples = mmbench_samples(DATA / "mmbench.tsv")
    (tmp_path / "dp").mkdir()  # a row of an earlier run over more samples (e.g. without --limit) is kept
    (tmp_path / "dp" / "predictions.jsonl").write_text(json.dumps({"id": "zz", "category": "x", "score": 1.0}) + "\n")
    results = {}

    def rank(r):
        local.rank = r
        results[r] = runner.run_samples(None, samples, tmp_path / "dp", meta={"task": "mmbench"})

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(seen[0]) == 4 + 2 and len(seen[1]) == 3  # rank 0: samples 1 and 3, rank 1: sample 2
    assert all("shape is shown" in q for q in seen[1])
    assert [r["id"] for r in rows(tmp_path / "dp")] == ["1", "2", "3", "zz"]
    assert results[0]["n"] == 3
    assert sorted(p.name for p in (tmp_path / "dp").iterdir()) == ["predictions.jsonl", "run.json", "summary.json"]
    monkeypatch.setattr(runner, "dist_info", lambda: (0, 1))
    single = runner.run_samples(None, samples, tmp_path / "dp", meta={"task": "mmbench"})  # one process now: everything is on disk
    for k in ("n", "accuracy", "categories"):
        assert results[0][k] == results[1][k] == single[k]
    assert results[1]["world_size"] == 2 and single["computed"] == 0


def test_torchrun_two_ranks_merge_into_the_single_process_result(chat_checkpoint, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["eval", "--task", "mmbench", "--data", str(DATA / "mmbench.tsv"), "--model", str(chat_checkpoint),
            "--max-new-tokens", "3", "--batch-size", "1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    # two ranks with torchrun's environment (the launcher itself would only add a third torch import)
    procs = [subprocess.Popen([sys.executable, "-m", "hyperowl.cli", *args, "--out", str(tmp_path / "two")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", RANK=str(rank),
                                       LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for _, e in outs]
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [x["id"] for x in two] == ["1", "2", "3"]   # merged in data order
    assert [x["prediction"] for x in two] == [x["prediction"] for x in one]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["predictions.jsonl", "run.json", "summary.json"]
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["n"] == 3 and outs[0][0].count("all") == 1 and outs[1][0] == ""  # rank 0 prints


def test_other_benchmark_spellings(monkeypatch, tmp_path):
    """NExT-QA's a0..a4 columns, LongVideoBench's candidates + correct_choice, MVBench's answer as text,
    VQAv2's answer_type "yes/no" kept whole (no "groups" split on its slash)."""
    shutil.copy(DATA / "images" / "red_circle.png", tmp_path / "r.png")
    recs = [{"qid": "n1", "frames": ["r.png"], "question": "q1", "a0": "x", "a1": "y", "a2": "z", "answer": 2},
            {"id": "l1", "frames": ["r.png"], "question": "q2", "candidates": ["u", "v"], "correct_choice": 1},
            {"id": "m1", "frames": ["r.png"], "question": "q3", "candidates": ["(A) u", "(B) v"], "answer": "(B) v"}]
    (tmp_path / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = video_mc_samples(tmp_path / "v.jsonl")
    assert [x.id for x in s] == ["n1", "l1", "m1"] and [x.answer for x in s] == ["C", "B", "B"]
    assert "\nC. z\n" in s[0].build()[0]["messages"][0]["content"]
    monkeypatch.setattr(runner, "chat_batch", lambda m, convs, **k: ["yes"] * len(convs))
    summary = harness.run(None, harness.prepare("vqa", str(DATA / "vqa.jsonl"), tmp_path), tmp_path / "vqa")
    assert "groups" not in summary and summary["categories"]["yes/no"]["accuracy"] == 1.0
    assert summary["accuracy"] == pytest.approx(1 / 3)


def test_cli_synthetic_task_prints_categories(chat_checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["eval", "--task", "synthetic-multi", "--limit", "3", "--model", str(chat_checkpoint), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--max-new-tokens", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["category", "n", "accuracy"] and printed[-1].split()[:2] == ["all", "3"]
    assert {l.split()[0] for l in printed[1:-1]} == {"multi/which", "multi/same", "multi/diff"}
    assert (tmp_path / "cache" / "synthetic-multi-n3-seed0" / "test.jsonl").exists() and (out / "summary.json").exists()


def test_distractor_reads_mmbench_tsv_too():
    plan = harness.prepare("distractor", str(DATA / "mmbench.tsv"), "unused", pool=str(DATA / "pool"), distractors="2")
    assert [it.id for it in plan.items] == ["1", "2", "3"] and plan.counts == [2]
    s = dis.distractor_samples(plan.items, plan.pool, 2)[1]   # the hint stays in front of the question
    for c, k in zip(s.build(), s.extra["target_image"]):
        assert c["images"][k - 1] == plan.items[1].image and isinstance(c["images"][k - 1], bytes)
        assert f"Look carefully.\nLook at image {k}. What shape is shown?\nA. " in c["messages"][0]["content"]


V2 = DATA / "vqav2"
V2Q, V2A = V2 / "v2_OpenEnded_mscoco_val2014_questions.json", V2 / "v2_mscoco_val2014_annotations.json"


def test_vqav2_official_two_file_format(model, tmp_path):
    samples = vqa_samples(V2Q, V2A, V2 / "val2014")
    assert [s.id for s in samples] == ["42000", "7001"]  # question order, answers joined by question_id
    assert [s.category for s in samples] == ["other", "yes/no"]
    assert samples[0].answer == ["red"] * 9 + ["orange"]
    conv = samples[0].build()[0]
    assert conv["images"][0].endswith("COCO_val2014_000000000042.jpg")
    out = tmp_path / "v2"
    s = harness.run(model, harness.prepare("vqa", str(V2Q), out, annotations=str(V2A), image_dir=str(V2 / "val2014")),
                    out, max_new_tokens=3)
    rs = rows(out)
    assert s["n"] == 2 and set(s["categories"]) == {"other", "yes/no"}
    for r in rs:
        assert r["score"] == pytest.approx(vqa_soft_accuracy(r["prediction"], r["answer"]))


def test_vqav2_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(InputError, match="--annotations"):
        vqa_samples(V2Q)  # the questions file alone has no answers
    with pytest.raises(InputError, match="image 42 not found.*--image-dir"):
        vqa_samples(V2Q, V2A, tmp_path)  # wrong image folder
    anns = json.loads(V2A.read_text())
    anns["annotations"] = anns["annotations"][:1]
    bad = tmp_path / "ann.json"
    bad.write_text(json.dumps(anns))
    with pytest.raises(InputError, match="question_id 42000 has no entry"):
        vqa_samples(V2Q, bad, V2 / "val2014")
    with pytest.raises(InputError, match="official VQAv2"):
        vqa_samples(DATA / "vqa.jsonl", V2A)
    with pytest.raises(InputError, match="--task vqa"):
        harness.prepare("mmbench", str(DATA / "mmbench.tsv"), tmp_path, annotations=str(V2A))

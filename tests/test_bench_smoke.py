"""Smoke runs of the benchmarks (small sizes): they run and write their JSON. Numbers are not asserted here."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))


def test_load_memory_bench_smoke(tmp_path):
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, "bench/bench_load_memory.py", "--hidden", "128", "--layers", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [row["loader"] for row in rows] == ["hyperowl", "naive"]
    assert all(row["peak_rss_increase_bytes"] > 0 for row in rows)


def test_long_context_bench_smoke(tmp_path):
    out = tmp_path / "lc.json"
    r = subprocess.run([sys.executable, "bench/bench_long_context.py", "--images", "1", "2", "--hidden", "128", "--decode", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["images"] for row in rows] == [1, 2] and all(row["decode_tok_s"] > 0 for row in rows)


def test_vs_llava_bench_smoke(tmp_path):
    out = tmp_path / "vs.json"
    r = subprocess.run([sys.executable, "bench/bench_vs_llava.py", "--shape", "tiny", "--ours", "1", "2", "--baseline", "1", "2",
                        "--decode", "2", "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    got = sorted((row["model"], row["images"]) for row in res["rows"])
    assert got == [("hyperowl", 1), ("hyperowl", 2), ("llava", 1), ("llava", 2)]
    ours = [row for row in res["rows"] if row["model"] == "hyperowl"]
    assert all(0 < row["floor_s"] and 0 < row["ttft_warm_s"] and row["flops"] > row["floor_flops"] > 0 for row in ours)
    assert res["summary"]["ttft_speedup_at_largest_baseline_n"]["images"] == 2
    assert (res["device"], res["dtype"], res["memory"]) == ("cpu", "float32", "peak RSS")  # auto: float32 on CPU


def _bench_module(name, folder="bench"):
    spec = importlib.util.spec_from_file_location(name, f"{folder}/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("capacity", [1000, 3999, 50_000])
def test_find_max_images_finds_the_boundary(capacity):
    """The search bench_vs_llava --max-images runs: with peak = 100 + 3 N bytes (fits iff N <= (capacity - 100) / 3)
    it returns the largest fitting N it probed, within its 5% step of the true one, and never one that does not fit."""
    bench = _bench_module("bench_vs_llava")
    probed = []

    def probe(n):
        probed.append(n)
        peak = 100 + 3 * n
        return peak if peak <= capacity else None  # over the budget: "out of memory"

    known = [(n, 100 + 3 * n) for n in (1, 2, 4, 8)]
    n, peak = bench.find_max_images(probe, known, capacity, max_probes=20)
    true = (capacity - 100) // 3
    assert peak == 100 + 3 * n <= capacity
    assert true / 1.06 <= n <= true
    assert len(probed) <= 20


def test_until_oom_ends_a_sweep_at_the_first_out_of_memory():
    """bench_vs_llava's sweeps on a GPU: the first N that runs out of memory is a result row and ends the sweep;
    any other error is a bug and propagates."""
    import torch

    bench = _bench_module("bench_vs_llava")

    def point(n):
        if n >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"images": n}

    rows = list(bench.until_oom([1, 2, 4, 8], point, bench.Meter("cpu")))
    assert rows == [{"images": 1}, {"images": 2}, {"images": 4, "oom": True}]

    def broken(n):
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        list(bench.until_oom([1], broken, bench.Meter("cpu")))


def test_long_video_bench_smoke(tmp_path):
    out = tmp_path / "lv.json"
    # sparse video: 25 fps, a keyframe every 100 frames (4 s); 8 targets 9 s apart -> auto takes keyframes
    r = subprocess.run([sys.executable, "bench/bench_long_video.py", "--hours", "0.02", "--frames", "8", "--sparse-gop", "100",
                        "--repeats", "1", "--workdir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    rows = {(row["mode"], row["video"]): row for row in json.loads(out.read_text())["rows"]}
    assert rows[("full", "dense")]["frames_decoded"] == int(0.02 * 3600 * 4)
    assert rows[("keyframes", "dense")]["decoded_per_kept"] <= rows[("exact", "dense")]["decoded_per_kept"]
    assert rows[("exact", "dense")]["kept"] == 8
    auto, exact = rows[("auto", "sparse")], rows[("exact", "sparse")]
    assert auto["used"] == "keyframe" and auto["keyframe_interval_s"] == 4.0 and auto["file_max_gop_packets"] == 100
    assert auto["decoded_per_kept"] <= 2 < 10 < exact["decoded_per_kept"]
    assert exact["max_error_s"] == 0 and 0 < auto["max_error_s"] <= 2.0  # half a keyframe interval at most


def test_video_encode_bench_smoke(tmp_path):
    out = tmp_path / "ve.json"
    r = subprocess.run([sys.executable, "bench/bench_video_encode.py", "--hours", "0.01", "--frames", "6", "--chunk", "2",
                        "--repeats", "1", "--workdir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [row["mode"] for row in res["rows"]] == ["decode only", "encode only", "sequential", "chunked", "overlapped"]
    assert res["same_embeddings"] and all(row["frames"] == 6 for row in res["rows"])


def test_quantize_bench_smoke(tmp_path):
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, "bench/bench_quantize.py", "--shape", "tiny", "--images", "2", "--decode", "2",
                        "--repeats", "1", "--questions", "3", "--out", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [row["weights"] for row in res["speed"]] == ["float32", "int8"]
    assert res["speed"][1]["llm_linear_bytes"] < res["speed"][0]["llm_linear_bytes"]
    assert res["quality"]["questions"] == 3 and 0 <= res["quality"]["same_answer"] <= 1


def test_probe_tower_smoke(tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "scripts/probe_tower.py", "--images", "60", "--steps", "4", "--every", "2",
                        "--batch-size", "4", "--out", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["step"] for row in rows] == [2, 4]
    assert all(0 <= row[g] <= 1 for row in rows for g in ("colours", "kinds", "cells", "pairs"))


@pytest.mark.parametrize("images,extra", [("solid", []), ("objects", []), ("solid", ["--aux", "1", "--label", "after"])])
def test_probe_index_smoke(tmp_path, images, extra):
    out = tmp_path / "probe"
    r = subprocess.run([sys.executable, "scripts/probe_index.py", "--images", images, "--model", "tiny", "--steps", "3",
                        "--train", "12", "--test", "10", "--out", str(out), *extra], capture_output=True, text=True,
                       timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["n"] == 10 and 0 <= summary["accuracy"] <= 1
    for line in (out / "test.jsonl").read_text().splitlines():  # every answer is what the images say
        row = json.loads(line)
        q = row["messages"][0]["content"].splitlines()[-1]
        if row["task"] == "index/which" and images == "solid":
            target = q.removeprefix("Which image is ").rstrip("?")
            assert row["answer"] == f"image {row['images'].index(f'img/{target}.png') + 1}"
        assert row["messages"][-1]["content"] == row["answer"] and len(row["images"]) == 4
        if extra:  # the label after each image
            assert row["messages"][0]["content"].startswith("<|image|> image 1\n")
    if extra:  # --aux 1: every training conversation shows the images one per turn, answers from that image
        for line in (out / "train.jsonl").read_text().splitlines():
            row = json.loads(line)
            msgs = row["messages"]
            assert len(msgs) == 10
            for k in range(4):
                assert msgs[2 * k]["content"] == f"Image {k + 1}: <|image|>\nWhat colour is it?"
                assert row["images"][k] == f"img/{msgs[2 * k + 1]['content']}.png"


def test_bench_padding_smoke(tmp_path):
    """Exact counts on a small file: rows of 1 and 6 turns mixed; grouping must cut the padded tokens."""
    rows = [{"messages": [{"role": "user", "content": "<|image|>What colour is it?"},
                          {"role": "assistant", "content": "red"}] * (1 if i % 3 else 6), "images": [], "videos": []}
            for i in range(96)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "padding.json"
    r = subprocess.run([sys.executable, "bench/bench_padding.py", "--data", str(data), "--batch-size", "8", "--groups", "0,4",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    plain, grouped = json.loads(out.read_text())["results"]
    assert plain["real_tokens"] == grouped["real_tokens"]  # the same rows, one epoch
    assert grouped["padded_tokens"] < plain["padded_tokens"] and grouped["efficiency"] > plain["efficiency"]
    assert grouped["padded_tokens"] >= grouped["real_tokens"]


def test_bench_train_step_smoke(tmp_path):
    """Two workers settings over the same steps: both timed, same tokens per step (the same batches)."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(24):
            Image.new("RGB", (28, 28), (40 * (i % 6), 20, 200)).save(tmp_path / f"img/{i}.png")
            turn = [{"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": f"colour {i % 6}"}]
            f.write(json.dumps({"messages": [{"role": "user", "content": "<|image|>Hi"}, turn[1]] + turn * (i % 2),
                                "images": [f"img/{i}.png"]}) + "\n")
    (tmp_path / "r.yaml").write_text(
        f"init: {{preset: tiny-240728, tokenizer: train, vocab_size: 300}}\n"
        f"data: {{train: {tmp_path / 'train.jsonl'}, group_by_length: 2}}\nbatch_size: 4\n")
    out = tmp_path / "step.json"
    r = subprocess.run([sys.executable, "bench/bench_train_step.py", "--recipe", str(tmp_path / "r.yaml"), "--tokenizer",
                        "train", "--workers", "0,1", "--steps", "3", "--blocks", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["workers"] for row in rows] == [0, 1] and all(row["steps_timed"] == 4 for row in rows)
    assert rows[0]["tokens_per_step"] == rows[1]["tokens_per_step"] > 0
    assert all(row[f"{ph}_ms"] > 0 for row in rows for ph in ("forward", "backward", "optimizer"))


def test_bench_train_procs_smoke(tmp_path):
    """One process against two data-parallel ones (torchrun): both run the recipe and are timed from its log."""
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(32):
            f.write(json.dumps({"messages": [{"role": "user", "content": "What colour is it?"},
                                             {"role": "assistant", "content": f"colour {i % 6}"}]}) + "\n")
    (tmp_path / "r.yaml").write_text(
        "init: {preset: tiny-240728, tokenizer: train, vocab_size: 300}\n"
        f"data: {{train: {tmp_path / 'other.jsonl'}}}\nstage: instruct\noptim: {{lr: 1.0e-3}}\nbatch_size: 4\n")
    out = tmp_path / "procs.json"
    r = subprocess.run([sys.executable, "bench/bench_train_procs.py", "--recipe", str(tmp_path / "r.yaml"), "--tokenizer",
                        "train", "--data", str(tmp_path / "train.jsonl"), "--cores", "2", "--steps", "4", "--skip", "1",
                        "--blocks", "1", "--out", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(row["procs"], row["threads_each"]) for row in rows] == [(1, 2), (2, 1)]
    assert all(row["s_per_step"] > 0 for row in rows) and rows[0]["speedup"] == 1.0


def test_bench_visual_slots_smoke(tmp_path):
    out = tmp_path / "vs.json"
    r = subprocess.run([sys.executable, "bench/bench_visual_slots.py", "--rows", "3", "--big", "2", "--repeats", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [(row["mode"], row["images_projected"]) for row in res["results"]] == [("padded", 6), ("packed", 4)]
    every, own = res["segment_rows"]["results"]
    assert (every["mode"], own["mode"]) == ("every", "own") and own["row_segments"] < every["row_segments"]


def test_loss_head_bench_smoke(tmp_path):
    out = tmp_path / "head.json"
    r = subprocess.run([sys.executable, "bench/bench_loss_head.py", "--batch", "2", "--length", "16", "--hidden", "8",
                        "--vocab", "32", "--answers", "3", "--reps", "2", "--blocks", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    assert [row["head"] for row in json.loads(out.read_text())["rows"]] == ["full", "answers"]


def test_probe_relation_questions_and_name_tokens():
    """The probe's labels are what the scene says, and its name positions point at the names' last tokens."""
    import hyperowl

    mod = _bench_module("probe_relation", "scripts")
    items = mod.questions(60, seed=3)
    assert len(items) == 60 and {it["answer"] for it in items} == {"yes", "no"}
    proc = hyperowl.load().processor
    for it in items:
        scene, q = it["scene"], it["q"]
        rel = next(r for r in ("left of", "right of", "above", "below") if f" {r} " in q)
        a = next(o for o in scene.objects if o.name == it["a"])
        b = next(o for o in scene.objects if o.name == it["b"])
        axis = 1 if rel in ("left of", "right of") else 0
        assert (it["a_coord"], it["b_coord"]) == (scene.cell(a)[axis], scene.cell(b)[axis])
        before = scene.cell(a)[axis] < scene.cell(b)[axis]
        assert it["answer"] == ("yes" if before == (rel in ("left of", "above")) else "no")
        assert q.index(it["a"]) < q.index(it["b"])
        prompt = proc([{"role": "user", "content": "<|image|>" + q}], images=[scene.render()]).prompt
        ids, _ = proc._tokenize(prompt)
        for name, after in ((it["a"], 0), (it["b"], prompt.index(it["a"]) + len(it["a"]))):
            i = mod.last_token_of(proc, prompt, ids, name, after)
            last, nxt = proc.tokenizer.decode([ids[i]]).strip(), proc.tokenizer.decode([ids[i + 1]])
            assert i >= 0 and last and name.endswith(last) and nxt[:1] in (" ", "?", ",")  # the name ends there


def test_probe_relation_smoke(tmp_path):
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "scripts/probe_relation.py", "--n", "40", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["n"] <= 40 and res["held_out"] >= 5 and len(res["rows"]) == 5  # embeddings + 4 layers
    assert all(0 <= v <= 1 for row in res["rows"] for k, v in row.items() if k != "layer")

"""The embedded model following a synthetic-world stream live (library and `hyperowl watch`), against the
offline answers on the same frames."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hyperowl
from hyperowl.data.synthetic.world import Obj, Scene

ROOT = Path(__file__).resolve().parent.parent


def world_stream(n=8):
    """A red square crossing the middle row left to right; a blue circle appears in the top row halfway."""
    out = []
    for k in range(n):
        objs = [Obj("square", "red", "large", 8 + k * 48 // (n - 1), 32)]
        if k >= n // 2:
            objs.append(Obj("circle", "blue", "small", 32, 8))
        out.append(Scene(tuple(objs), "white", 64).render())
    return out


@pytest.fixture(scope="module")
def owl():
    return hyperowl.load(device="cpu")


@torch.no_grad()
def test_embedded_model_live_equals_offline(owl):
    f = world_stream(8)
    q1, q2 = "Which way does the red square move?", "What appears in the video?"
    live = owl.live(max_new_tokens=12)
    for k in range(4):  # frame by frame, as a stream delivers them
        live.add_frames(f[k])
    a1 = live.ask(q1)
    live.add_frames(f[4:])
    a2 = live.ask(q2)
    messages = [{"role": "user", "content": "<|video|>" + q1}]
    assert a1 == owl.chat(messages, videos=[f[:4]], max_new_tokens=12) and a1.strip()
    messages += [{"role": "assistant", "content": a1}, {"role": "user", "content": "<|video|>" + q2}]
    assert a2 == owl.chat(messages, videos=[f[:4], f[4:]], max_new_tokens=12) and a2.strip()
    plan = owl.processor.plan(messages, videos=[f[:4], f[4:]])
    ref = owl.model(plan.input_ids[None], image_embeds=owl.encoder.encode(plan),
                    image_positions=plan.image_positions[None]).logits[0, -1]
    assert (live.last_logits - ref).abs().max() <= 1e-4
    live.close()


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "hyperowl.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_watch_scripted_equals_the_library(owl, tmp_path):
    from hyperowl.data.synthetic.writer import write_mp4
    from hyperowl.processing.video import sample_frames_with_times

    clip = tmp_path / "world.mp4"
    write_mp4(world_stream(8), clip, fps=2)  # 4 s
    r = run_cli("watch", str(clip), "--fps", "2", "--fast", "--ask", "What appears in the video?", "--at", "1s",
                "--ask", "Which way does the red square move?", "--at", "1m", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    # the library on the frames the sampler picks at 2 fps, asked at the same stream times
    frames, times = sample_frames_with_times(clip, max_frames=100, fps=2)
    live = owl.live(max_new_tokens=12)
    live.add_frames(frames[:3], timestamps=times[:3])  # up to 1.0 s
    a1 = live.ask("What appears in the video?")
    live.add_frames(frames[3:], timestamps=times[3:])  # the rest: the stream ends at 3.5 s, before 1 min
    a2 = live.ask("Which way does the red square move?")
    assert r.stdout == (f"[1.0s] Q: What appears in the video?\n[1.0s] A: {a1}\n"
                        f"[3.5s] Q: Which way does the red square move?\n[3.5s] A: {a2}\n")
    assert "ended at 3.5s" in r.stderr and "8 frames seen, 8 kept" in r.stderr
    live.close()


def test_watch_bad_input_is_one_line(tmp_path):
    r = run_cli("watch", str(tmp_path / "none.mp4"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "none.mp4" in r.stderr
    r = run_cli("watch", "/dev/video99")
    assert r.returncode == 2 and "camera '/dev/video99': no such device" in r.stderr
    r = run_cli("watch", "x.mp4", "--ask", "q", "--at", "soon")
    assert r.returncode == 2 and "--at 'soon': not a time" in r.stderr


def test_parse_time():
    from hyperowl.cli import parse_time

    assert [parse_time(t) for t in ("90", "30s", "1m30s", "2h", "1:30", "1:02:03", "0.5s")] == \
        [90, 30, 90, 7200, 90, 3723, 0.5]

"""The `hyperowl` command end to end (real subprocesses, real files) and the Python chat API."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import hyperowl


def run(*args, stdin=None, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "hyperowl.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    a, b = d / "a.png", d / "b.jpg"
    Image.new("RGB", (50, 30), (200, 10, 10)).save(a)
    Image.new("RGB", (20, 70), (10, 10, 200)).save(b)
    bad = d / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    return a, b, bad


def test_python_chat_and_stream(chat_checkpoint, image_files):
    model = hyperowl.load(chat_checkpoint)
    a, b, _ = image_files
    messages = [{"role": "user", "content": "<|image|><|image|>Compare the two pictures."}]
    before = json.dumps(messages)
    answer = model.chat(messages, images=[str(a), str(b)], max_new_tokens=6)
    assert isinstance(answer, str) and answer
    assert "".join(model.chat(messages, images=[str(a), str(b)], max_new_tokens=6, stream=True)) == answer
    assert json.dumps(messages) == before  # the caller's messages are untouched
    with pytest.raises(hyperowl.InputError, match="placeholder"):
        model.chat(messages, images=[str(a)])


def test_cli_one_shot_with_images(chat_checkpoint, image_files):
    a, b, _ = image_files
    r = run("chat", "--model", str(chat_checkpoint), "--image", str(a), "--image", str(b), "--max-new-tokens", "5",
            "Compare the two pictures.")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_cli_interactive(chat_checkpoint, image_files):
    a, _, bad = image_files
    script = f"/image {a}\nWhat colour is it?\n/image {bad}\nAnd now?\n/image /nonexistent.png\n/quit\n"
    r = run("chat", "--model", str(chat_checkpoint), "--max-new-tokens", "4", stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("owl>") == 2
    assert "broken.png" in r.stderr and "nonexistent.png" in r.stderr  # errors named, chat went on
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--image", "/no/such.png", "hi"], "no/such.png"),
    (["--video", "/no/such.mp4", "hi"], "no/such.mp4"),
])
def test_cli_missing_inputs_are_one_line_errors(chat_checkpoint, args, needle):
    r = run("chat", "--model", str(chat_checkpoint), *args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_corrupt_image(chat_checkpoint, image_files):
    r = run("chat", "--model", str(chat_checkpoint), "--image", str(image_files[2]), "hi")
    assert r.returncode == 2 and "broken.png" in r.stderr and "Traceback" not in r.stderr


def test_cli_placeholder_mismatch(chat_checkpoint, image_files):
    r = run("chat", "--model", str(chat_checkpoint), "--image", str(image_files[0]), "<|image|><|image|>two?")
    assert r.returncode == 2 and "placeholder" in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_model_paths(tmp_path):
    r = run("chat", "--model", str(tmp_path / "nope"), "hi")
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps({"model_type": "mplugowl3"}))
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"pickle")
    r = run("info", str(tmp_path / "pickled"))
    assert r.returncode == 2 and "pickle" in r.stderr and "Traceback" not in r.stderr


def test_cli_hub_id_without_network(tmp_path):
    env_home = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "hyperowl.cli", "info", "mPLUG/mPLUG-Owl3-7B-241101"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, HF_HOME=str(env_home), HF_HUB_OFFLINE="1",
                                                       PYTHONPATH=os.getcwd()))
    assert r.returncode == 2 and "mPLUG/mPLUG-Owl3-7B-241101" in r.stderr and "Traceback" not in r.stderr


def test_cli_info(chat_checkpoint):
    r = run("info", str(chat_checkpoint), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["variant"] == "240728" and info["hyper_layers"] == [1, 3] and info["tokenizer"] is True
    from safetensors import safe_open

    with safe_open(str(chat_checkpoint / "model.safetensors"), "pt") as f:
        assert info["parameters"] == sum(f.get_tensor(k).numel() for k in f.keys())


def test_video_chat_python_and_cli(chat_checkpoint, tmp_path):
    from test_video import make_video

    video = make_video(tmp_path / "clip.mp4", n_frames=30)
    model = hyperowl.load(chat_checkpoint)
    inputs = model.processor([{"role": "user", "content": "<|video|>Describe this video."}], videos=[str(video)], max_frames=5)
    assert inputs.num_images == 5  # one image token per sampled frame, no cutting
    answer = model.chat([{"role": "user", "content": "<|video|>Describe this video."}], videos=[str(video)],
                        max_frames=5, max_new_tokens=4)
    assert isinstance(answer, str)  # a random toy model: the text itself is meaningless
    r = run("chat", "--model", str(chat_checkpoint), "--video", str(video), "--frames", "4", "--max-new-tokens", "3",
            "What happens?")
    assert r.returncode == 0, r.stderr
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(video.read_bytes()[:300])
    r = run("chat", "--model", str(chat_checkpoint), "--video", str(broken), "What happens?")
    assert r.returncode == 2 and "broken.mp4" in r.stderr and "Traceback" not in r.stderr


def test_chat_batch_equals_single_chats(chat_checkpoint, image_files):
    model = hyperowl.load(chat_checkpoint)
    a, b, _ = image_files
    convs = [
        {"messages": [{"role": "user", "content": "<|image|>What colour is the circle?"}], "images": [str(a)]},
        {"messages": [{"role": "user", "content": "Describe this."}]},
        {"messages": [{"role": "user", "content": "<|image|><|image|>Compare the two pictures."}], "images": [str(b), str(a)]},
    ]
    batch = model.chat_batch(convs, max_new_tokens=5)
    single = [model.chat(c["messages"], images=c.get("images"), max_new_tokens=5) for c in convs]
    assert batch == single


def _subparsers():
    import argparse

    from hyperowl.cli import build_parser

    p = build_parser()
    return p, next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_debug_after_the_subcommand():
    p, subs = _subparsers()
    assert p.parse_args(["chat", "hi"]).debug is False
    assert p.parse_args(["chat", "--debug", "hi"]).debug is True
    assert p.parse_args(["--debug", "chat", "hi"]).debug is True  # the subcommand's absent --debug keeps it
    assert p.parse_args(["--debug", "chat", "--debug", "hi"]).debug is True
    needs = {"train": ["r.yaml"], "plot-log": ["log.jsonl"], "convert": ["a", "b"], "info": ["x"],
             "upgrade": ["--text-llm", "t", "--vision", "v", "--hyper-layers", "1", "--out", "o"],
             "pretrain-vision": ["--out", "o"], "batch": ["in.jsonl", "--out", "o.jsonl"],
             "export": ["ckpt", "--peft", "--out", "o"], "watch": ["clip.mp4"]}
    for name in subs:
        assert p.parse_args([name, *needs.get(name, [])]).debug is False, name
        assert p.parse_args([name, "--debug", *needs.get(name, [])]).debug is True, name
        assert p.parse_args(["--debug", name, *needs.get(name, [])]).debug is True, name


def test_shared_options_are_the_same_everywhere():
    """chat, serve and eval take --model/--dtype/--device/--quantize from one group, chat and serve the video
    options; dests and defaults are what users' scripts rely on."""
    _, subs = _subparsers()

    def spec(name, opt):
        a = next(a for a in subs[name]._actions if opt in a.option_strings)
        return a.dest, a.default, a.choices, a.type, a.nargs, type(a).__name__, a.help

    for opt, want in [("--model", ("model", None, None, None, None)), ("--device", ("device", None, None, None, None)),
                      ("--dtype", ("dtype", None, ["float32", "bfloat16", "float16"], None, None)),
                      ("--quantize", ("quantize", None, ["int8"], None, None))]:
        assert spec("chat", opt) == spec("serve", opt) == spec("eval", opt), opt
        assert spec("chat", opt)[:5] == want, opt
    for opt, want in [("--frames", ("frames", 16, None, int, None)), ("--fps", ("fps", None, None, float, None)),
                      ("--no-cut", ("no_cut", False, None, None, 0))]:
        assert spec("chat", opt) == spec("serve", opt), opt
        assert spec("chat", opt)[:5] == want, opt
    assert spec("eval", "--frames")[:2] == ("frames", 16)
    a = subs["chat"].parse_args(["hi"])
    sampling = (a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.seed)
    assert sampling == (1024, 0.0, 0, 1.0, 1.0, None)
    assert (a.image, a.video, a.system) == ([], [], None)
    a = subs["eval"].parse_args([])
    assert (a.max_new_tokens, a.seed, a.frames, a.task, a.out) == (16, 0, 16, "exact", "results/eval")


def test_cli_debug_after_subcommand_shows_the_traceback(tmp_path):
    r = run("chat", "--debug", "--model", str(tmp_path / "nope"), "hi")
    assert r.returncode != 0 and "Traceback" in r.stderr and "nope" in r.stderr

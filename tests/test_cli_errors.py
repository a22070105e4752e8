"""Bad input on the CLI and library side gets one line naming the input as the user gave it (issue 34): the real
`hyperowl` command in subprocesses, the embedded model, the tiny fixture checkpoints."""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import hyperowl
from conftest import OWL2_FIXTURE, OWL3_FIXTURE, random_owl3, skip_without
from hyperowl.errors import CheckpointError, InputError

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def run(*args, cwd=None, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "hyperowl.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=cwd)


def one_line_error(r, *needles) -> str:
    """The single stderr line of a user error (exit 2, no traceback), which names every needle."""
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (50, 30), (200, 10, 10)).save(d / "good.png")
    Image.new("RGB", (50, 30), (10, 10, 200)).save(d / "good.jpg")
    (d / "bad.png").write_bytes(b"\x89PNG not really")
    Image.new("1", (12000, 12000)).save(d / "big.png")  # 144 megapixels in 17 kB: PIL only warns about it
    frames = [Image.new("RGB", (48, 32), (40 * i, 0, 0)) for i in range(5)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(d / "still.gif")
    return d


# -- interactive chat: a bad attachment is dropped, the conversation goes on -----------------------------------
def test_interactive_bad_image_is_dropped_and_the_chat_goes_on(media):
    script = "/image bad.png\nhello\n/image good.png\nwhat colour?\nand now?\n/quit\n"
    r = run("chat", "--max-new-tokens", "3", cwd=media, stdin=script)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    # One error, at /image, naming the file as typed; before the fix it repeated for every later message.
    assert len(errors) == 1 and "image 'bad.png'" in errors[0], errors
    answers = [a.strip() for a in r.stdout.split("owl>")[1:]]
    assert len(answers) == 3 and all(a.removesuffix("you>").strip() for a in answers), r.stdout


class _Session:
    """An interactive `hyperowl chat`, one line at a time: each line is sent once the previous one is done
    (the next `you>` prompt is on stdout)."""

    def __init__(self, *args, cwd):
        self.p = subprocess.Popen([sys.executable, "-m", "hyperowl.cli", "chat", *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=cwd)
        self.out: queue.Queue[str] = queue.Queue()
        self.stdout = ""
        threading.Thread(target=self._pump, daemon=True).start()
        self.wait_prompt(1)

    def _pump(self):
        while ch := self.p.stdout.read(1):
            self.out.put(ch)

    def wait_prompt(self, n: int, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while self.stdout.count("you>") < n:
            self.stdout += self.out.get(timeout=max(0.1, end - time.monotonic()))

    def say(self, line: str) -> None:
        n = self.stdout.count("you>")
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        self.wait_prompt(n + 1)

    def close(self) -> str:
        self.p.stdin.write("/quit\n")
        self.p.stdin.close()
        self.p.wait(timeout=60)
        return self.p.stderr.read()


def test_interactive_attachment_that_fails_in_the_answer_is_dropped(media, tmp_path):
    """A file that was fine at /image but fails while the answer reads it (here: overwritten in between) is
    dropped with its error; the next message, with another image, is answered."""
    pic = tmp_path / "pic.png"
    shutil.copy(media / "good.png", pic)
    s = _Session("--max-new-tokens", "3", cwd=tmp_path)
    s.say("/image pic.png")
    pic.write_bytes(b"garbage now")
    s.say("hello")
    s.say(f"/image {media / 'good.jpg'}")
    s.say("what colour?")
    err = s.close()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "image 'pic.png'" in errors[0] and "dropped pic.png" in errors[0], errors
    assert s.stdout.rsplit("owl>", 1)[1].removesuffix("you>").strip()  # the last message was answered


# -- device, dtype, port, host, frames: one line and exit 2 -----------------------------------------------------
def _busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_device_port_and_host_errors_are_one_line():
    cuda = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    one_line_error(run("chat", "--device", "banana", "hi"), "device 'banana'", "use cpu, cuda")
    one_line_error(run("chat", "--device", cuda, "hi"), f"device '{cuda}'")
    one_line_error(run("serve", "--device", "banana"), "device 'banana'")
    one_line_error(run("serve", "--port", "99999"), "--port 99999", "65535")
    one_line_error(run("serve", "--host", "no-such-host.invalid"), "no-such-host.invalid")
    with _busy_port() as busy:
        port = busy.getsockname()[1]
        one_line_error(run("serve", "--port", str(port)), f"--port {port}", "cannot listen")


def test_library_device_and_dtype_errors():
    for device in ("banana", "cuda:99", "meta"):
        with pytest.raises(InputError, match=f"device '{device}'"):
            hyperowl.load(device=device)
    for dtype in ("float8", "int8", torch.float64):
        with pytest.raises(InputError, match="dtype .*: not supported; use float32, bfloat16, float16"):
            hyperowl.load(dtype=dtype, device="cpu")


def test_frames_and_seed_limits(media):
    from hyperowl.limits import MAX_FRAMES
    from hyperowl.processing.video import probe_video

    one_line_error(run("chat", "--frames", str(MAX_FRAMES + 1), "hi"), f"--frames {MAX_FRAMES + 1}", str(MAX_FRAMES))
    one_line_error(run("chat", "--seed", str(2**64), "--temperature", "1", "hi"), f"--seed {2**64}", "64 bits")
    with pytest.raises(InputError, match=f"max_frames={MAX_FRAMES + 1}"):
        probe_video(media / "anim.gif", max_frames=MAX_FRAMES + 1)


def test_debug_after_data_synth(tmp_path):
    r = run("data", "synth", "--out", str(tmp_path / "syn"), "--train", "1", "--val", "1", "--test", "1", "--debug")
    assert r.returncode == 0, r.stderr
    assert "DEBUG" in r.stderr or "INFO" in r.stderr  # debug logging is on


def test_serve_engine_flags_and_data_out_folders_are_one_line(tmp_path):
    one_line_error(run("serve", "--live-session-idle-s", "-5"), "--live-session-idle-s -5", ">= 0")
    one_line_error(run("serve", "--kv-cache-gb", "0"), "--kv-cache-gb 0", "> 0")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for sub in (["synth", "--train", "1", "--val", "0", "--test", "0"], ["ood", "--n", "3"]):
        one_line_error(run("data", sub[0], "--out", str(blocker / "out"), *sub[1:]), f"data {sub[0]}", str(blocker))
    one_line_error(run("data", "synth", "--out", str(tmp_path / "w"), "--workers", "0"), "--workers 0", "1 or more")


# -- media limits: one definition for library, CLI and server ----------------------------------------------------
def test_pixel_bomb_refused_by_cli_and_library_like_the_server(media):
    from hyperowl import limits
    from hyperowl.processing.images import load_image
    from hyperowl.serve.media import MAX_IMAGE_PIXELS

    assert MAX_IMAGE_PIXELS == limits.MAX_IMAGE_PIXELS  # the server's 413 limit is the library's
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's decompression-bomb warning would fail here
        with pytest.raises(InputError, match="image 'big.png': 12000x12000 is 144.0 megapixels, more than"):
            load_image(media / "big.png", name="big.png")
    err = one_line_error(run("chat", "--image", "big.png", "hi", cwd=media), "image 'big.png'", "megapixel limit")
    assert "DecompressionBomb" not in err


def test_image_passed_as_video_is_refused(media):
    from hyperowl.processing.video import probe_video

    one_line_error(run("chat", "--video", "good.png", "hi", cwd=media), "video 'good.png'", "still image")
    for name in ("good.jpg", "still.gif"):
        with pytest.raises(InputError, match=f"video '.*{name}': is a still image"):
            probe_video(media / name)
    assert len(probe_video(media / "anim.gif", max_frames=16)) == 5  # an animation is a video


def test_media_type_message_grammar():
    from hyperowl.serve.media import MediaLimits, _from_data_url
    from hyperowl.serve.protocol import ApiError, MediaPart

    for kind, article in (("image", "an image"), ("video", "a video")):
        part = MediaPart(kind=kind, url="data:text/plain;base64,aGk=", param="messages[0].content[0]")
        with pytest.raises(ApiError, match=f"is not {article} type"):
            _from_data_url(part, MediaLimits())


# -- config.json against the family's schema ---------------------------------------------------------------------
def _checkpoint(src: Path, dst: Path, edit) -> Path:
    dst.mkdir(parents=True)
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _set(key: str, value):
    def edit(cfg):
        *path, last = key.split(".")
        for p in path:
            cfg = cfg[p]
        if value is _MISSING:
            del cfg[last]
        else:
            cfg[last] = value
    return edit


_MISSING = object()
OWL3_CASES = [
    ("hidden_size", -64, "hidden_size = -64: expected an integer > 0"),
    ("num_attention_heads", 5, "num_attention_heads = 5: expected a divisor of hidden_size (64)"),
    ("num_hidden_layers", _MISSING, "num_hidden_layers is missing: expected an integer > 0"),
    ("num_key_value_heads", 3, "num_key_value_heads = 3: expected a divisor of num_attention_heads (4)"),
    ("hyper_layers", [1, 9], "hyper_layers[1] = 9: expected a 1-based layer number in 1..4"),
    ("rms_norm_eps", "tiny", 'rms_norm_eps = "tiny": expected a number'),
    ("eos_token_id", 5000, "eos_token_id = 5000: expected a token id"),
    ("vision_config.hidden_size", -3, "vision_config.hidden_size = -3: expected an integer > 0"),
    ("vision_config.num_attention_heads", 3, "vision_config.num_attention_heads = 3: expected a divisor of "
     "vision_config.hidden_size (32)"),
    ("vision_config.patch_size", 56, "vision_config.patch_size = 56: expected at most vision_config.image_size (28)"),
]
OWL2_CASES = [
    ("hidden_size", -64, "hidden_size = -64: expected an integer > 0"),
    ("num_attention_heads", 5, "num_attention_heads = 5: expected a divisor of hidden_size (64)"),
    ("num_hidden_layers", _MISSING, "num_hidden_layers is missing: expected an integer > 0"),
    ("rope_scaling", {"type": "linear"}, 'rope_scaling = {"type": "linear"}: expected null'),
    ("image_aspect_ratio", "wide", 'image_aspect_ratio = "wide": expected one of "resize"'),
    ("visual_config.visual_model.hidden_size", 48,
     "visual_config.visual_abstractor.encoder_hidden_size = 32: expected 48, the same as "
     "visual_config.visual_model.hidden_size"),
    ("visual_config.visual_model.num_attention_heads", 3, "visual_config.visual_model.num_attention_heads = 3"),
    ("visual_config.visual_abstractor.grid_size", 3, "visual_config.visual_abstractor.grid_size = 3: expected 2"),
    ("visual_config.visual_abstractor.hidden_size", 30, "visual_config.visual_abstractor.hidden_size = 30: "
     "expected a multiple of 4"),
]


@pytest.fixture(scope="module")
def owl3_241101_dir(tmp_path_factory) -> Path:
    from hyperowl.checkpoint import save_checkpoint

    return save_checkpoint(random_owl3("241101"), tmp_path_factory.mktemp("owl3-241101"))


@skip_without(OWL3_FIXTURE)
@pytest.mark.parametrize("key, value, message", OWL3_CASES, ids=[c[0] for c in OWL3_CASES])
@pytest.mark.parametrize("variant", ["240728", "241101"])
def test_owl3_config_json_is_checked(variant, key, value, message, owl3_241101_dir, tmp_path):
    from hyperowl.checkpoint import load_checkpoint

    src = OWL3_FIXTURE if variant == "240728" else owl3_241101_dir
    d = _checkpoint(src, tmp_path / "m", _set(key, value))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert str(e.value).startswith(f"{d / 'config.json'}: {message}"), str(e.value)


@skip_without(OWL2_FIXTURE)
@pytest.mark.parametrize("key, value, message", OWL2_CASES, ids=[c[0] for c in OWL2_CASES])
def test_owl2_config_json_is_checked(key, value, message, tmp_path):
    from hyperowl.checkpoint import load_checkpoint

    d = _checkpoint(OWL2_FIXTURE, tmp_path / "m", _set(key, value))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert str(e.value).startswith(f"{d / 'config.json'}: {message}"), str(e.value)


@skip_without(OWL3_FIXTURE)
def test_good_configs_pass_and_cli_names_the_file(tmp_path):
    """The shipped and fixture configs pass the schema; a bad one is one line on the CLI (`info` and `chat`)."""
    from hyperowl.checkpoint import read_config
    from hyperowl.config_schema import check_config

    for d in (OWL3_FIXTURE, OWL2_FIXTURE, hyperowl.default_model_dir()):
        raw = read_config(d)
        check_config(raw["model_type"], raw)
    d = _checkpoint(OWL3_FIXTURE, tmp_path / "neg", _set("hidden_size", -64))
    for args in (["info", str(d)], ["chat", "--model", str(d), "hi"]):
        one_line_error(run(*args), f"{d / 'config.json'}: hidden_size = -64: expected an integer > 0")
    (d / "config.json").write_text("[1, 2]")
    one_line_error(run("info", str(d)), f"{d / 'config.json'}: expected a JSON object")

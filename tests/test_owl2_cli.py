"""`hyperowl chat / info / convert` on mPLUG-Owl2 checkpoints (real subprocesses)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hyperowl

from conftest import OWL2_FIXTURE as FIX, make_tokenizer, skip_without

pytestmark = skip_without(FIX)


def run(*args, stdin=None, timeout=180):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "hyperowl.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def owl2_chat_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("owl2-chat")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(FIX / name, d / name)
    make_tokenizer().save(str(d / "tokenizer.json"))
    img = d / "a.png"
    Image.new("RGB", (50, 30), (200, 10, 10)).save(img)
    return d


def test_python_chat_and_stream(owl2_chat_dir):
    model = hyperowl.load(owl2_chat_dir, device="cpu")
    assert type(model.processor).__name__ == "Owl2Processor"
    msgs = [{"role": "user", "content": "<|image|>What colour is the circle?"}]
    answer = model.chat(msgs, images=[str(owl2_chat_dir / "a.png")], max_new_tokens=5)
    assert isinstance(answer, str)
    assert "".join(model.chat(msgs, images=[str(owl2_chat_dir / "a.png")], max_new_tokens=5, stream=True)) == answer


def test_cli_chat_and_info(owl2_chat_dir):
    r = run("chat", "--model", str(owl2_chat_dir), "--image", str(owl2_chat_dir / "a.png"), "--max-new-tokens", "4",
            "What colour is the circle?")
    assert r.returncode == 0, r.stderr
    r = run("info", str(owl2_chat_dir), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["model_type"] == "mplug_owl2" and "abstractor" in info and info["tokenizer"] is True


def test_convert_requires_trust_pickle(tmp_path):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(FIX / "config.json", src / "config.json")
    torch.save(load_file(str(FIX / "model.safetensors")), src / "pytorch_model.bin")
    r = run("info", str(src))
    assert r.returncode == 2 and "hyperowl convert" in r.stderr
    r = run("convert", str(src), str(tmp_path / "out"))
    assert r.returncode == 2 and "--trust-pickle" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
    r = run("convert", str(src), str(tmp_path / "out"), "--trust-pickle")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "config.json").exists()
    m = hyperowl.load(tmp_path / "out", device="cpu")
    assert type(m.model).__name__ == "Owl2Model"

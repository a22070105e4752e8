"""The server hashes each image once: the bytes it received (serve/media.py) give the media item's content key
(processing/plan.py `Hashed`); the planner does not hash the decoded pixels again. Equal bytes, equal keys (the
feature cache and the prefix cache match them); other bytes, other keys."""

from __future__ import annotations

import base64
import hashlib

import pytest

pytest.importorskip("fastapi")

from conftest import png_data_url  # noqa: E402
import hyperowl.processing.plan as plan  # noqa: E402
from hyperowl.serve.media import MediaBlob  # noqa: E402
from hyperowl.serve.prompt import VisualOptions, build_prompt  # noqa: E402
from hyperowl.serve.protocol import ChatRequest, MediaPart, Message, TextPart  # noqa: E402


@pytest.fixture(scope="module")
def pipe(chat_checkpoint):
    import hyperowl

    return hyperowl.load(chat_checkpoint, device="cpu")


def _prompt(pipe, colors):
    blobs, parts = [], []
    for i, c in enumerate(colors):
        data = base64.b64decode(png_data_url(c).split(",", 1)[1])
        blobs.append(MediaBlob("image", data, hashlib.sha256(data).hexdigest(), f"messages[0].content[{i}]"))
        parts.append(MediaPart("image", "data:", f"messages[0].content[{i}]"))
    req = ChatRequest(model="m", messages=[Message("user", parts + [TextPart("What is it?")])])
    return build_prompt(req, blobs, pipe, VisualOptions(cut=False)), blobs


def test_image_keys_are_the_received_bytes_digest(pipe, monkeypatch):
    def no_second_hash(src):
        raise AssertionError(f"hashed again: {type(src).__name__}")

    monkeypatch.setattr(plan, "_digest_source", no_second_hash)
    prompt, blobs = _prompt(pipe, [(200, 30, 30), (10, 200, 10), (200, 30, 30)])
    keys = [p.key for p in prompt.items]
    assert all(b.digest in p.item.key for p, b in zip(prompt.items, blobs))
    assert keys[0] == keys[2] != keys[1]

"""Endless live streams under a memory ceiling (hyperowl/live.py, cache.py `evict`): what a question prefills,
the text the model reads and the K/V it keeps stay bounded however long the stream runs.

Before these changes, the note about what is still visible was prefilled with every question and grew with
the number of stride runs, and the text K/V of evicted frames (time stamp, placeholder) stayed forever."""

import copy

import pytest
import torch

from conftest import random_owl3
from test_live import VARIANTS, frames, make_pipe


@pytest.fixture(scope="module", params=VARIANTS)
def pipe(request):
    return make_pipe(request.param)


class Recorder:
    """The session's model, recording how many tokens each forward is given."""

    def __init__(self, model):
        self.model, self.lengths = model, []

    def __call__(self, ids, **kw):
        self.lengths.append(ids.shape[1])
        return self.model(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.mark.parametrize("timed", [True, False])
def test_a_long_stream_keeps_the_question_and_the_text_bounded(pipe, timed):
    cfg = pipe.model.config
    per_frame = len(cfg.hyper_layers) * 2 * cfg.num_kv_heads * cfg.vision.tokens_per_image * cfg.head_dim * 4
    f = frames(6, seed=7)
    probe = pipe.live()
    probe.add_frames(f[0], timestamps=[0.0])
    probe.flush()
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    ceiling = probe.memory_bytes() + 60 * per_frame + 300 * per_token  # the tiny models' text costs much
    probe.close()
    live = pipe.live(max_new_tokens=1, memory_gb=ceiling / 2**30)
    rec = live.model = Recorder(live.model)
    question = "What is happening?"
    end = "<|end_video_frame|>" if cfg.variant == "241101" else ""
    alone = len(live._encode(f"{end}{question}<|im_end|>\n<|im_start|>assistant\n"))
    asked, notes, lengths = [], [], []
    for k in range(480):
        live.add_frames(f[k % 6], timestamps=[float(k)] if timed else None)
        if k % 40 == 39:
            live.flush()
            # the text the model reads is the prompt: the evicted frames' and the replaced notes' text is gone
            assert live.tokenizer.decode(live.ids, skip_special_tokens=False) == live.prompt()
            notes.append(live.visible_note())
            own = max(fr.own for fr in live.frames if fr.kept)  # a frame's own tokens (stamp, placeholder)
            lengths.append((live.cache.length, sum(fr.kept for fr in live.frames), own))
            if k in (119, 479):
                n = len(rec.lengths)
                live.ask(question)
                asked.append(rec.lengths[n])  # the question's prefill
            assert live.memory_bytes() <= ceiling
    st = live.status()
    assert st["frames_seen"] == 480 and st["frames_kept"] < 240
    # a question prefills its own tokens only, however long the stream and however much was dropped
    assert asked == [alone, alone]
    # the note is one constant-form sentence (two runs), told once in the text: the newest replaces the last
    assert all(note.count("every") <= 2 for note in notes) and "every frame from" in notes[-1]
    assert ("0.0s" if timed else "frame 1 ") in notes[-1]
    assert live.prompt().count("(Frames were dropped") == 1 and notes[-1] in live.prompt()
    # the text K/V do not grow with the stream (every frame adds its placeholder, and a stamp when timed): the
    # kept text holds the kept frames', the note and the two questions' turns
    # (the rest: the system turn, the note, the first question's turn: ~150 tokens with this tokenizer)
    assert all(length <= kept * own + 250 for length, kept, own in lengths)
    assert live.cache.length == len(live.ids)
    live.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_evicting_text_slots_reads_like_masking_them(variant):
    """KVCache.evict moves the kept slots; a later forward gives what the same cache gives with the evicted
    slots marked invalid (as padding)."""
    torch.manual_seed(0)
    model = random_owl3(variant)
    cfg = model.config
    size, t = cfg.vision.image_size, cfg.vision.tokens_per_image
    ids = torch.randint(10, 200, (1, 30))
    pos = torch.tensor([[4, 9, 15, 22]])
    ids[0, pos[0]] = 5
    with torch.no_grad():
        feats = model.encode_images(torch.randn(4, 3, size, size))
        cache = model.new_cache(64)
        model(ids, image_embeds=feats, image_positions=pos, cache=cache, last_logits_only=True)
    masked = copy.deepcopy(cache)
    drop_text = [3, 9, 10, 11, 17]  # image 1's placeholder (slot 9) and text around it
    keep_text = torch.tensor([k for k in range(30) if k not in drop_text])
    cache.evict(torch.tensor([0, 2, 3]), keep_text)
    assert cache.length == 25 and cache.nv[cfg.hyper_layers[0] - 1] == 3 * t
    masked.drop_images(torch.tensor([0, 2, 3]))  # images alone: the visual eviction live sessions had already
    masked.key_valid[0, drop_text] = False
    new = torch.randint(10, 200, (1, 5))
    with torch.no_grad():
        got = model(new, cache=cache).logits
        ref = model(new, cache=masked).logits
    assert (got - ref).abs().max() <= 1e-5

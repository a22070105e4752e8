"""The incremental detokenizer (chat.TextStream): half a UTF-8 character is held back, a byte that no later byte
can complete is not (it used to delay the first content chunk by a decode step, or lose a short answer's text);
what it emits always adds up to the tokenizer's decode of the whole answer. Byte-level BPE (Owl3's kind); with
SentencePiece byte fallback (Owl2's kind), whose decode of a bad byte run changes the valid bytes before it too,
every trailing U+FFFD is held back as before (there even text already sent can turn into U+FFFD when a bad byte
follows in the same byte run: a property of that decoder, not checked here)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models

from conftest import make_tokenizer
from hyperowl.chat import TextStream


@pytest.fixture(scope="module")
def byte_level():
    return make_tokenizer()


def _byte_id(tok, b: int) -> int:
    """The id of the single-byte token for byte b (byte-level BPE)."""
    from hyperowl.chat import _byte_level_map

    ch = {v: k for k, v in _byte_level_map().items()}[b]
    i = tok.token_to_id(ch)
    assert i is not None
    return i


def _fallback_tokenizer() -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581hi": 3, "\u2581the": 4}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def _pushes(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.push(t) for t in ids]


def test_byte_level_invalid_byte_goes_out_at_once_and_half_a_character_waits(byte_level):
    tok = byte_level
    lone = _byte_id(tok, 0x9E)  # a continuation byte with no lead byte: never valid
    assert _pushes(TextStream(tok), [lone]) == ["\ufffd"]
    assert _pushes(TextStream(tok), [_byte_id(tok, 0xF5)]) == ["\ufffd"]  # never valid in UTF-8
    e_acute = [_byte_id(tok, 0xC3), _byte_id(tok, 0xA9)]  # é split in two byte tokens
    assert _pushes(TextStream(tok), e_acute) == ["", "é"]
    euro = [_byte_id(tok, b) for b in "€".encode()]
    assert _pushes(TextStream(tok), euro) == ["", "", "€"]
    # a lone byte, then half a character: the first goes out, the second waits
    assert _pushes(TextStream(tok), [lone, e_acute[0], e_acute[1]]) == ["\ufffd", "", "é"]


def test_fallback_keeps_holding_back():
    tok = _fallback_tokenizer()
    b = {x: tok.token_to_id(f"<0x{x:02X}>") for x in (0x6A, 0x9E, 0xC3, 0xA9)}
    hi, the = tok.token_to_id("\u2581hi"), tok.token_to_id("\u2581the")
    assert _pushes(TextStream(tok), [hi, b[0x9E], b[0x6A], the]) == [" hi", "", "", "\ufffd\ufffd the"]
    assert _pushes(TextStream(tok), [b[0xC3], b[0xA9]]) == ["", "é"]


def test_the_pieces_add_up_to_the_whole_decode(byte_level):
    tok = byte_level
    rnd = random.Random(0)
    for _ in range(200):
        ids = [rnd.randrange(tok.get_vocab_size()) for _ in range(rnd.randrange(1, 12))]
        pieces = _pushes(TextStream(tok), ids)
        whole = tok.decode(ids, skip_special_tokens=True)
        done = "".join(pieces)
        assert whole.startswith(done), (ids, pieces, whole)
        # only an unfinished character at the very end may still be held back
        rest = whole[len(done):]
        assert set(rest) <= {"\ufffd"} and len(rest) <= 4, (ids, pieces, whole)

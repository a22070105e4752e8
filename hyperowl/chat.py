"""Chat: conversations -> answer text, through a pipeline (processor plan -> encoder -> engine -> text).

Design note: this is the only layer that knows both the tokenizer and the engine. It turns sampling
options into `SamplingParams` (stop tokens from the model-family table), hands the engine token ids and
features, and decodes. Streaming decodes incrementally and only emits text that is complete (never half
a UTF-8 character). `chat` and `chat_batch` are the functions behind `Pipeline.chat` / `.chat_batch`.

A decoded text ending in U+FFFD is held back only while its last bytes are the start of a character that later
bytes can complete; a byte that no later byte makes valid (a lone continuation byte, 0xF5-0xFF: what a random or
confused model often produces first) decodes to U+FFFD for good, so it goes out at once: holding it back delayed
the first content chunk by a decode step, or lost a short answer's text altogether. The bytes are read from a
byte-level BPE vocabulary (Owl3's Qwen2 kind); a tokenizer of another kind keeps the plain rule.
"""

from __future__ import annotations

import codecs
from typing import Any, Callable, Iterator, Optional, Sequence

from tokenizers import Tokenizer

from .engine import Engine, Request, SamplingParams
from .errors import InputError


class TextStream:
    """Incremental detokenizer: push ids, get the newly completed text."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[int] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, set(stops)
        self.ids: list[int] = []
        self.sent = 0
        self._bytes = token_bytes(tokenizer)

    def push(self, token: int) -> str:
        if token in self.stops:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and self._incomplete():  # wait for the bytes that complete the character
            return ""
        new, self.sent = text[self.sent :], len(text)
        return new

    def _incomplete(self) -> bool:
        """Whether the ids end inside a UTF-8 character that more bytes can complete (True when unknown)."""
        if self._bytes is None:
            return True
        tail = b""
        for t in reversed(self.ids):  # the last 4 bytes hold the start of any unfinished character
            b = self._bytes(t)
            if b is None:
                return True
            tail = b + tail
            if len(tail) >= 4:
                break
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        dec.decode(tail[-4:], final=False)
        return bool(dec.getstate()[0])


def _byte_level_map() -> dict[str, int]:
    """The GPT-2 byte-level alphabet: printable bytes stand for themselves, the others for chr(256 + n)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    out, n = {chr(b): b for b in keep}, 0
    for b in range(256):
        if b not in keep:
            out[chr(256 + n)] = b
            n += 1
    return out


def token_bytes(tokenizer: Tokenizer) -> Optional[Callable[[int], Optional[bytes]]]:
    """id -> the bytes it decodes to (b"" for a special token, None when unknown) for a byte-level BPE tokenizer;
    None for other kinds (SentencePiece's byte fallback decodes a run of byte tokens that is not valid UTF-8 to
    one U+FFFD per byte, the valid bytes before the bad one included, so its text is final only once the run
    ends: the plain rule stays)."""
    kind = repr(getattr(tokenizer, "decoder", None))
    try:
        added = tokenizer.get_added_tokens_decoder()
    except AttributeError:
        return None
    if kind.startswith("ByteLevel"):
        table = _byte_level_map()

        def plain(piece: str) -> Optional[bytes]:
            try:
                return bytes(table[c] for c in piece)
            except KeyError:
                return None
    else:
        return None

    def of(t: int) -> Optional[bytes]:
        a = added.get(t)
        if a is not None:
            return b"" if a.special else a.content.encode()
        piece = tokenizer.id_to_token(t)
        return None if piece is None else plain(piece)
    return of


def make_params(stops: tuple[int, ...], **options: Any) -> SamplingParams:
    """Sampling options (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, ...) with the
    family's stop ids; a bad option is the user's error."""
    try:
        return SamplingParams(stop_token_ids=stops, **options)
    except (TypeError, ValueError) as e:
        raise InputError(f"sampling options: {e}") from None


def make_constraint(pipe, schema: Any):
    """The grammar constraint of one request: a JSON schema (dict) or "json_object" (any JSON object); None: free
    text. A schema the grammar library cannot take is the user's error."""
    if schema is None:
        return None
    from .structured import grammars_for

    try:
        return grammars_for(_processor(pipe).tokenizer, pipe.model.config.vocab_size).constraint(schema, pipe.stop_ids)
    except ValueError as e:
        raise InputError(f"json_schema: {e}") from None


def _processor(pipe) -> Any:
    if pipe.processor is None:
        raise InputError("this model has no tokenizer (no tokenizer.json in its checkpoint directory); "
                         "use a checkpoint that ships one, or pass a processor to hyperowl.Pipeline")
    return pipe.processor


def chat(pipe, messages: Sequence[Any], images: Any = None, videos: Any = None, *, stream: bool = False,
         max_frames: int = 16, fps: float | None = None, cut: bool | None = None, system: str | None = None,
         json_schema: Any = None, **sampling: Any) -> str | Iterator[str]:
    """Answer the last user message (see `Pipeline.chat`). Planning and encoding run now (bad input fails
    here, even with stream=True); generation runs as the answer is read. json_schema: a JSON schema (dict) or
    "json_object": the answer is JSON that validates (grammar-constrained decoding, structured.py)."""
    proc = _processor(pipe)
    plan = proc.plan(messages, images=images, videos=videos, max_frames=max_frames, fps=fps, cut=cut, system=system)
    params = make_params(pipe.stop_ids, **sampling)
    constraint = make_constraint(pipe, json_schema)
    embeds = pipe.encoder.encode(plan, progress=None)
    events = Engine(pipe.model).stream([Request(plan.input_ids, embeds, plan.image_positions, params,
                                                constraint=constraint)])
    text = TextStream(proc.tokenizer, params.stop_token_ids)

    def pieces() -> Iterator[str]:
        for step in events:
            for _, token in step:
                piece = text.push(token)
                if piece:
                    yield piece

    return pieces() if stream else "".join(pieces())


def chat_batch(pipe, conversations: Sequence[dict], json_schema: Any = None, **sampling: Any) -> list[str]:
    """Several independent conversations in one padded batch. Each item: {"messages", "images"?, "videos"?,
    "json_schema"? (this conversation's; default: the json_schema argument, see `chat`)}."""
    proc = _processor(pipe)
    plans = [proc.plan(c["messages"], images=c.get("images"), videos=c.get("videos")) for c in conversations]
    params = make_params(pipe.stop_ids, **sampling)
    constraints = [make_constraint(pipe, c.get("json_schema", json_schema)) for c in conversations]
    embeds = pipe.encoder.encode_many(plans)
    outs = Engine(pipe.model).generate([Request(p.input_ids, e, p.image_positions, params, constraint=k)
                                        for p, e, k in zip(plans, embeds, constraints)])
    return [detokenize(proc.tokenizer, o, params.stop_token_ids) for o in outs]


def score_batch(pipe, conversations: Sequence[dict], continuations: Sequence[Sequence[str]]) -> list[list[list[float]]]:
    """Per conversation, per continuation text: the log probability of each of its tokens as the start of the
    answer (`Engine.score`; the definition of the logprobs the server reports). A continuation is tokenized
    alone, without special tokens, as the answer's first tokens are (Owl2's SentencePiece adds its word-start
    mark, as after "ASSISTANT:"). Conversations as in `chat_batch`, one padded prefill."""
    proc = _processor(pipe)
    plans = [proc.plan(c["messages"], images=c.get("images"), videos=c.get("videos")) for c in conversations]
    ids = []
    for conts in continuations:
        ids.append([proc.tokenizer.encode(t, add_special_tokens=False).ids for t in conts])
        empty = [t for t, x in zip(conts, ids[-1]) if not x]
        if empty:
            raise InputError(f"continuation {empty[0]!r} tokenizes to nothing; give some text")
    embeds = pipe.encoder.encode_many(plans)
    return Engine(pipe.model).score([Request(p.input_ids, e, p.image_positions) for p, e in zip(plans, embeds)], ids)


def detokenize(tokenizer: Tokenizer, ids: Sequence[int], stops: Sequence[int] = ()) -> str:
    """The text `chat` would have streamed for these ids (the same rule: stop ids dropped, an incomplete
    trailing character held back), so batched and single answers are equal strings."""
    text = TextStream(tokenizer, stops)
    return "".join(text.push(t) for t in ids)

"""Chat: messages + media -> answer text, through the processor and the engine.

Design note: this is the only layer that knows both the tokenizer and the engine. It turns sampling
options into `SamplingParams` (stop tokens = the tokenizer's `<|im_end|>` and `<|endoftext|>`), runs the
engine, and decodes. Streaming decodes incrementally and only emits text that is complete (never half a
UTF-8 character).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from tokenizers import Tokenizer

from .engine import Engine, Request, SamplingParams
from .errors import InputError
from .processing.chat import STOP_TOKENS
from .processing.processor import Owl3Processor, ProcessedInputs


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    return tuple(i for i in (tokenizer.token_to_id(t) for t in STOP_TOKENS) if i is not None)


class TextStream:
    """Incremental detokenizer: push ids, get the newly completed text."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[int] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, set(stops)
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> str:
        if token in self.stops:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return ""
        new, self.sent = text[self.sent :], len(text)
        return new


def processor_stops(processor) -> tuple[int, ...]:
    """A processor may define its own stop ids (Owl2: `</s>`); else the ChatML stops of its tokenizer."""
    own = getattr(processor, "stop_token_ids", None)
    return tuple(own) if own else stop_ids(processor.tokenizer)


def make_params(tokenizer: Tokenizer, stops: tuple[int, ...] | None = None, **options: Any) -> SamplingParams:
    try:
        return SamplingParams(stop_token_ids=stop_ids(tokenizer) if stops is None else stops, **options)
    except (TypeError, ValueError) as e:
        raise InputError(f"sampling options: {e}") from None


def requests_for(model, inputs: list[ProcessedInputs], params: SamplingParams) -> list[Request]:
    return [Request(x.input_ids, pixel_values=x.pixel_values, image_embeds=x.image_embeds,
                    image_positions=x.image_positions, params=params) for x in inputs]


def chat(
    model,
    processor: Owl3Processor | None,
    messages: Sequence[Any],
    images: Any = None,
    videos: Any = None,
    *,
    stream: bool = False,
    max_frames: int = 16,
    fps: float | None = None,
    cut: bool | None = None,
    system: str | None = None,
    **sampling: Any,
) -> str | Iterator[str]:
    """Answer the last user message. sampling: max_new_tokens, temperature, top_k, top_p,
    repetition_penalty, seed (greedy by default)."""
    if processor is None:
        raise InputError("this model has no tokenizer (no tokenizer.json in its checkpoint directory); "
                         "use a checkpoint that ships one, or attach an Owl3Processor as model.processor")
    extra = {}
    if videos is not None and isinstance(processor, Owl3Processor):
        # Videos are encoded chunk by chunk as they decode (bounded pixel memory); on an accelerator the next
        # chunk decodes in a thread meanwhile. On CPU the two would share the cores: measured slower there.
        extra["encode"] = torch.no_grad()(model.encode_images)
        extra["overlap"] = model.device.type != "cpu"
    inputs = processor(messages, images=images, videos=videos, max_frames=max_frames, fps=fps, cut=cut, system=system,
                       **extra)
    params = make_params(processor.tokenizer, processor_stops(processor), **sampling)
    engine = Engine(model)
    events = engine.stream(requests_for(model, [inputs], params))
    text = TextStream(processor.tokenizer, params.stop_token_ids)

    def pieces() -> Iterator[str]:
        for step in events:
            for _, token in step:
                piece = text.push(token)
                if piece:
                    yield piece

    return pieces() if stream else "".join(pieces())


def chat_batch(model, processor: Owl3Processor, conversations: Sequence[dict], **sampling: Any) -> list[str]:
    """Several independent conversations in one padded batch. Each item: {"messages", "images"?, "videos"?}."""
    inputs = [processor(c["messages"], images=c.get("images"), videos=c.get("videos")) for c in conversations]
    params = make_params(processor.tokenizer, processor_stops(processor), **sampling)
    outs = Engine(model).generate(requests_for(model, inputs, params))
    stops = set(params.stop_token_ids)
    return [processor.tokenizer.decode([t for t in o if t not in stops], skip_special_tokens=True) for o in outs]

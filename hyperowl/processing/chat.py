"""ChatML prompt rendering for mPLUG-Owl3 (official 240728 format).

Design note
-----------
The official processor renders (no BOS):

    <|im_start|>system\\n{system}<|im_end|>
    \\n<|im_start|>user\\n{content}<|im_end|>
    \\n<|im_start|>assistant\\n{content}<|im_end|><|endoftext|>     (history assistant turns)
    \\n<|im_start|>assistant\\n                                      (generation prompt)

An empty system block is always present. Finished assistant turns are followed by `<|endoftext|>` (the
official "addition_eod"), because that is what the model saw in training. In inference mode the official
code drops a trailing assistant turn's content; its README therefore ends the message list with
`{"role": "assistant", "content": ""}` to get the generation prompt. We accept that idiom: a trailing
assistant message with empty content renders as the generation prompt (never twice).

Messages are validated here (role, content type) so that the processor can report the message index.
Content may be a string or an OpenAI-style list of `{"type": "text", "text": ...}` parts; the parts are
joined. Messages are never modified.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from hyperowl.errors import InputError

logger = logging.getLogger(__name__)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
IMAGE_TOKEN = "<|image|>"
VIDEO_TOKEN = "<|video|>"
# 241101 structure tokens.
START_CUT = "<|start_cut|>"
END_CUT = "<|end_cut|>"
START_VIDEO_FRAME = "<|start_video_frame|>"
END_VIDEO_FRAME = "<|end_video_frame|>"

ROLES = ("system", "user", "assistant")
# Tokens that end a generated answer.
STOP_TOKENS = (IM_END, ENDOFTEXT)


def message_text(message: Any, index: int) -> tuple[str, str]:
    """Validate one message and return (role, content as a string)."""
    if not isinstance(message, Mapping):
        raise InputError(
            f"messages[{index}]: expected a dict with 'role' and 'content', got {type(message).__name__}"
        )
    role = message.get("role")
    if role not in ROLES:
        raise InputError(f"messages[{index}]: role {role!r} is not one of system/user/assistant")
    if "content" not in message:
        raise InputError(f"messages[{index}]: missing 'content'; give the message text as a string")
    content = message["content"]
    if isinstance(content, str):
        return role, content
    if isinstance(content, (list, tuple)):
        parts: list[str] = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise InputError(
                    f"messages[{index}].content[{j}]: only text parts are supported "
                    f"({{'type': 'text', 'text': ...}}); put images/videos as {IMAGE_TOKEN}/{VIDEO_TOKEN} in the text"
                )
        return role, "".join(parts)
    raise InputError(
        f"messages[{index}]: content must be a string (or a list of text parts), got {type(content).__name__}"
    )


def normalize_messages(messages: Sequence[Any]) -> list[tuple[str, str]]:
    """Validate `messages` and return them as a new list of (role, content) pairs."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError("messages: expected a list of {'role': ..., 'content': ...} dicts")
    out = [message_text(m, i) for i, m in enumerate(messages)]
    for i, (role, _) in enumerate(out):
        if role == "system" and i != 0:
            raise InputError(f"messages[{i}]: a 'system' message is only allowed as the first message")
    return out


def render_chatml(
    messages: Sequence[Any],
    system: str = "",
    add_generation_prompt: bool = True,
    eod_after_assistant: bool = True,
) -> str:
    """Render `messages` in the official mPLUG-Owl3 ChatML format.

    A first message with role "system" replaces `system`. With `add_generation_prompt`, the prompt ends with
    the assistant header (a trailing assistant message with empty content is treated as that header).
    `eod_after_assistant` appends `<|endoftext|>` after finished assistant turns, as the official code does.
    """
    return "".join(text for text, _ in chatml_pieces(messages, system, add_generation_prompt, eod_after_assistant))


def chatml_pieces(
    messages: Sequence[Any],
    system: str = "",
    add_generation_prompt: bool = True,
    eod_after_assistant: bool = True,
) -> list[tuple[str, int | None]]:
    """`render_chatml`'s text as (text, index) pieces: each finished assistant turn's content is a piece of its
    own whose index is its message's index in `messages`; every other piece has index None. The text before an
    assistant content is exactly the prompt that turn was generated from (it ends with the assistant header)."""
    pairs = normalize_messages(messages)
    index = list(range(len(pairs)))
    if pairs and pairs[0][0] == "system":
        system = pairs[0][1]
        pairs, index = pairs[1:], index[1:]
    open_assistant = False
    if pairs and pairs[-1] == ("assistant", ""):
        # The official README's idiom for "now generate": an empty trailing assistant turn.
        pairs, index = pairs[:-1], index[:-1]
        open_assistant = True
    parts: list[tuple[str, int | None]] = [(f"{IM_START}system\n{system}{IM_END}", None)]
    for i, (role, content) in zip(index, pairs):
        if role == "assistant":
            parts += [(f"\n{IM_START}assistant\n", None), (content, i), (IM_END, None)]
            if eod_after_assistant:
                parts.append((ENDOFTEXT, None))
        else:
            parts.append((f"\n{IM_START}{role}\n{content}{IM_END}", None))
    if add_generation_prompt or open_assistant:
        parts.append((f"\n{IM_START}assistant\n", None))
    return parts


def chatml_segments(messages: Sequence[Any], system: str = "") -> list[tuple[str, bool]]:
    """The full conversation (as `render_chatml(..., add_generation_prompt=False)` renders it) split into
    (text, trainable) segments: each assistant turn's content and its `<|im_end|>` are trainable.

    The assistant header is its own segment, so tokenizing segment by segment gives exactly the tokens the
    model is conditioned on at inference (a prompt ending in the header), followed by the answer tokens.
    """
    pairs = normalize_messages(messages)
    if pairs and pairs[0][0] == "system":
        system = pairs[0][1]
        pairs = pairs[1:]
    segs = [(f"{IM_START}system\n{system}{IM_END}", False)]
    for role, content in pairs:
        if role == "assistant":
            segs += [(f"\n{IM_START}assistant\n", False), (f"{content}{IM_END}", True), (ENDOFTEXT, False)]
        else:
            segs.append((f"\n{IM_START}{role}\n{content}{IM_END}", False))
    return segs

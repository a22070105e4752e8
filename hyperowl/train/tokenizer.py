"""Tokenizers for training: trained from the conversations, or a text LLM's own plus the media tokens.

Design note. A model trained from a preset needs a tokenizer whose special tokens are the ones its chat
template writes: ChatML's `<|im_start|>`/`<|im_end|>` and the Owl3 media tokens (`SPECIAL_TOKENS`, ids
0..8 in that order), or LLaMA's `<unk>`/`<s>`/`</s>` (ids 0, 1, 2: the Owl2Config defaults) and the
placeholders (`OWL2_SPECIAL_TOKENS`), with a BOS added to every encoding as LLaMA's tokenizer does. An
upgraded model keeps its text LLM's tokenizer and gains the media tokens as added special tokens
(`with_media_tokens` for Owl3, `with_image_token` for Owl2); existing ids never move, so the text LLM's
embeddings stay valid.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, InputError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>", "<|video|>",
                  "<|start_cut|>", "<|end_cut|>", "<|start_video_frame|>", "<|end_video_frame|>"]
# LLaMA's ids first (unk 0, BOS 1, EOS 2: the Owl2Config defaults), then the media placeholders.
OWL2_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|image|>", "<|video|>"]


def train_tokenizer(jsonl: Path, vocab_size: int, owl2: bool = False):
    """A byte-level BPE trained on the conversations' text, with the chat special tokens first. For Owl2: the
    LLaMA special tokens, and a BOS added to every encoding (as LLaMA's tokenizer does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def texts():
        with jsonl.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    for m in json.loads(line).get("messages", []):
                        c = m.get("content")
                        yield c if isinstance(c, str) else " ".join(p.get("text", "") for p in c)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=OWL2_SPECIAL_TOKENS if owl2 else SPECIAL_TOKENS,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    if owl2:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def with_image_token(src_dir: Path, dst: Path) -> Path:
    """A LLaMA tokenizer.json plus `<|image|>` as a special token (the Owl2 placeholder; its id is never embedded)."""
    from ..processing.chat import IMAGE_TOKEN

    return _with_special_tokens(src_dir, dst, (IMAGE_TOKEN,), InputError(
        f"init.text_llm '{src_dir}': no tokenizer.json; the Owl2 model needs the LLaMA's tokenizer"))


def with_media_tokens(src_dir: Path, dst: Path) -> Path:
    """The text LLM's tokenizer.json plus the Owl3 media tokens (<|image|>, ...) as special tokens."""
    from ..processing.chat import END_CUT, END_VIDEO_FRAME, IMAGE_TOKEN, START_CUT, START_VIDEO_FRAME, VIDEO_TOKEN

    return _with_special_tokens(src_dir, dst, (IMAGE_TOKEN, VIDEO_TOKEN, START_CUT, END_CUT, START_VIDEO_FRAME,
                                               END_VIDEO_FRAME), CheckpointError(
        f"{src_dir}: no tokenizer.json; the upgraded model needs the text LLM's tokenizer"))


def _with_special_tokens(src_dir: Path, dst: Path, tokens: tuple[str, ...], missing: Exception) -> Path:
    """src_dir's tokenizer.json with `tokens` added as special tokens where it lacks them, saved to dst."""
    from tokenizers import AddedToken, Tokenizer

    src = Path(src_dir) / "tokenizer.json"
    if not src.exists():
        raise missing
    tok = Tokenizer.from_file(str(src))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens if tok.token_to_id(t) is None])
    dst.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst))
    return dst

"""The object `hyperowl.load()` returns: a model paired with its processor, encoder and family.

Design note: the `nn.Module` stays a pure model (the drop-in forward; nothing attached after
construction). Everything a user needs around it lives here: the processor (plans prompts), the encoder
(the only caller of the vision tower, with a content-hash feature cache, so a multi-turn chat or a
repeated image is encoded once), the family row (stop tokens, pad id) and where the checkpoint came from.
For code written against earlier versions, where `load()` returned the module itself, attribute access
falls through to the model (`owl.config`, `owl.encode_images`, `owl(input_ids=...)`: the drop-in forward).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .encoder import Encoder
from .families import Family, family_of
from .feature_cache import FeatureCache


class Pipeline:
    """model + processor + encoder. `.chat()`, `.stream()`, `.chat_batch()`, `.live()`; calls go to the model's
    forward."""

    def __init__(self, model: Any, processor: Any = None, *, encoder: Optional[Encoder] = None,
                 family: Optional[Family] = None, checkpoint_dir: Optional[Path] = None,
                 feature_cache_mb: float = 256.0) -> None:
        self.model = model
        self.processor = processor
        self.family = family or family_of(model.config)
        self.encoder = encoder or Encoder(model, processor, FeatureCache(int(feature_cache_mb * 2**20)))
        self.checkpoint_dir = checkpoint_dir

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end an answer (the family's stop tokens in this tokenizer)."""
        if self.processor is None:
            return ()
        return self.family.stop_ids(self.processor.tokenizer, self.model.config)

    @property
    def pad_id(self) -> int:
        return self.family.pad_id(self.processor.tokenizer if self.processor is not None else None, self.model.config)

    def chat(self, messages: Sequence[Any], images: Any = None, videos: Any = None, **options: Any):
        """Answer the last user message. options: stream (yield text pieces), max_frames, fps, cut, system,
        and sampling: max_new_tokens, temperature, top_k, top_p, repetition_penalty, min_new_tokens, seed
        (greedy by default)."""
        from .chat import chat

        return chat(self, messages, images, videos, **options)

    def stream(self, messages: Sequence[Any], images: Any = None, videos: Any = None, **options: Any) -> Iterator[str]:
        """`chat(..., stream=True)`: the answer's text pieces as they are generated."""
        return self.chat(messages, images, videos, stream=True, **options)

    def chat_batch(self, conversations: Sequence[dict], **sampling: Any) -> list[str]:
        """Independent conversations ({"messages", "images"?, "videos"?}) answered in one batch."""
        from .chat import chat_batch

        return chat_batch(self, conversations, **sampling)

    def live(self, **options: Any):
        """A live video session (`hyperowl.live.LiveSession`): `add_frames`, `follow`, `ask` at any time.
        options: system, memory_gb (K/V ceiling), recent_frames, and default sampling options."""
        from .live import LiveSession

        return LiveSession(self, **options)

    # -- the model underneath ----------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the pipeline lacks: the module's (config, device, encode_images, ...).
        if name == "model" or name.startswith("__"):  # not yet set (copying, unpickling), or a protocol hook
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"Pipeline({self.family.name}, {self.checkpoint_dir or type(self.model).__name__})"

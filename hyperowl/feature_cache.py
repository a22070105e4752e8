"""Visual feature cache: content hash of an image/video (+ preprocessing options) -> its image embeddings.

Design note: a follow-up question about the same picture or movie should not run the vision tower (or,
for a video, the decoder) again. Entries are keyed by the SHA-256 of the *encoded bytes* plus everything
that changes the embeddings (variant, image size, cutting, frame sampling, dtype), so two requests share an
entry only when the model would have computed the same tensor. The cache is an LRU bounded in bytes (the
tensors' own storage); an entry larger than the whole budget is simply not kept. Lookups and inserts come
from the request handlers' thread pool and from the scheduler's worker thread, hence the lock. `get`
returns the tensor itself: a caller holding it keeps it alive even if the entry is evicted meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable

from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedMedia:
    """Embeddings [N, T, H] of one image (N = crops + global view) or one video (N = frames), and the facts
    needed to rebuild its prompt without the pixels (frame count for a video)."""

    embeds: Tensor
    frames: int = 0

    @property
    def nbytes(self) -> int:
        return self.embeds.numel() * self.embeds.element_size()


class FeatureCache:
    """Thread-safe LRU of `CachedMedia` with a memory bound in bytes (0 disables the cache)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[Hashable, CachedMedia] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable) -> CachedMedia | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)  # most recently used last
            self.hits += 1
            return item

    def put(self, key: Hashable, item: CachedMedia) -> None:
        size = item.nbytes
        if size > self.max_bytes:  # would evict everything and still not fit
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = item
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1
                log.debug("feature cache: evicted %d bytes", evicted.nbytes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._items), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}

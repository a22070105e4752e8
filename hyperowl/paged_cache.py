"""The paged KV cache: fixed-size blocks in one pool, a block table per request, prefix blocks shared.

Design note
-----------
Storage. One pool tensor `[N + 1, 2, block_size, kv_heads, head_dim]` (K and V) holds every K/V of every
layer; a *pool block* is one layer's K/V for `block_size` slots. Pool blocks are fungible across layers and
kinds, so text and visual K/V draw from one byte budget with no static split:
- a text block (`Block`) of a request covers `block_size` sequence slots and owns one pool block per
  decoder layer (`units[layer]`);
- an image's visual K/V (`ImageKV`, Owl3 hyper layers only) own `ceil(T / block_size)` pool blocks per hyper
  layer (`units[hyper_index, j]`), its T tokens in order. Owl2's visual rows are ordinary sequence slots, so
  they live in text blocks.
A request holds blocks for its own slots and images and nothing for padding. Pool block 0 is never handed
out: it stays zero and is what padding entries of a gather read (finite, masked).

Attention over the pages. The models are left untouched: they talk to a cache through the narrow KVCache
API (cache.py: begin/commit/length/key_valid/next_pos/image_pos, write_text/text, append_images/alloc_visual/
visual/visual_and_text). `PagedView` implements that API for one forward over a batch of `PagedSeq`s: per layer,
on first use, it gathers each row's blocks into the contiguous padded layout the models already read
(rows' block lists right-aligned; the unused tail of a row's last block and the padding blocks are marked
invalid in `key_valid`; an image's blocks are cut back to exactly T slots, images back to back, so image
j starts at slot j*T as the hyper layers expect), and scatters the K/V the model writes (text, and new
images' visual K/V) straight into the rows' blocks. Only one layer's gathered copy lives at a time. Masking
by key validity and positions (never slot indices) is what makes holes in the middle harmless: RoPE
positions come from `next_pos`, and the text mask hides invalid slots, so each row computes exactly what
it computes alone. A batched prefill's new tokens are left-padded (rows of different chunk lengths): only
their real slots are written to the blocks, and each row's new images join its own old ones back to back
(`append_images`). The pool is slot-major, so a gather is one `index_select` copy and the models'
[B, heads, slots, D] is a transposed view of it (the text's gather is then joined to the new tokens' K/V, a
second copy of the text part; an image's spare tail slots, when T is not a multiple of the block size, cost
a second copy of the visual part). That copy per layer and step is the price of not touching the attention;
a fused paged-attention kernel (GPU) that reads the pool through the block table would avoid it (not written
here: SDPA is the one attention path of the package, models/layers.py `attend`).

Kept copies across decode steps (`KeptKV`). A decode step of the same rows would gather the same past again:
visual K/V never change during decode and dominate (a 32-frame video is 2048 visual slots per hyper layer),
so re-gathering them made a paged decode step ~2x the padded one. A decode group's view may be given a
`KeptKV`: the first step gathers as above into per-layer buffers with room for more text (head-major, like
KVCache's, so the attention reads contiguous keys) and later steps only append the new token's K/V to them
(besides writing it to the pool, which stays the truth). The copy is valid only for the same rows (the same
PagedSeq objects, at the lengths and image counts it recorded). Under load requests join and leave a group
almost every step, so the copy changes in place: a row that leaves is overwritten by the copy's last row, a
row that joins is gathered into a spare row (the buffers have a quarter more rows than they start with) when
its past fits the copy's layout (its text blocks within the kept past, its images within the kept visual
slots); otherwise the group's copy is rebuilt. A preempted request returns with a new PagedSeq, so its old row
is never read. All copies are bounded by `keep_bytes` (beyond it a group gathers every step, as before). The
view also refuses a copy whose rows' lengths or image counts moved.

Sharing. Full text blocks get a content key (a hash chain, computed by the engine) and are registered in
`BlockManager`; a later request whose prefix has the same keys acquires them (refcounted) together with
the visual K/V of the images whose placeholders lie in them (`Block.images`). A block whose last reference
goes stays cached if it has a key (evictable, least recently released first) and is freed otherwise.
Blocks are immutable once full, so sharing needs no copy-on-write: a request writes only into blocks past
its matched prefix. A leaving request's last, partly filled block is kept too (`keep_partial`, keyed by its
parent's key, with its tokens): a later request that continues those tokens (a chat's next turn) copies the
common slots into its own new block instead of recomputing up to block_size - 1 tokens.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .models.attention import BIG_POS

log = logging.getLogger(__name__)


def default_kv_cache_bytes(device: torch.device | str, share: float | None = None) -> int:
    """A KV budget from free memory: on CUDA `share` (default 0.8) of what `mem_get_info` reports free (call it
    after the model is loaded), on CPU `share` (default 0.3) of the available host memory (the host also holds
    features, the feature cache and the server). At least 64 MB."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        share = 0.8 if share is None else share
    else:
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:  # psutil is optional: the same number from sysconf
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        share = 0.3 if share is None else share
    return max(64 << 20, int(free * share))


@dataclass(eq=False)
class ImageKV:
    """One image's visual K/V in every hyper layer: units [hyper_layers, blocks_per_image] pool block ids."""

    units: Tensor
    pos: int = -1  # visible-from position (also its MI-Rope position); set when written


@dataclass(eq=False)
class Block:
    """`block_size` sequence slots in every layer (units [num_layers]), plus the images whose placeholders
    lie in them (freed or cached together with the block)."""

    units: Tensor
    images: list[ImageKV] = field(default_factory=list)
    key: bytes | None = None  # content key once full and registered (or kept partly filled: `keep_partial`)
    refs: int = 0
    tokens: tuple[int, ...] = ()  # a kept partly filled block: the token ids of its written slots

    def num_units(self) -> int:
        return self.units.numel() + sum(im.units.numel() for im in self.images)


class BlockManager:
    """The pool and its bookkeeping: free pool blocks, refcounts, registered (shareable) blocks, LRU eviction."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, block_size: int, num_units: int,
                 dtype: torch.dtype, device: torch.device | str, visual_layers: list[int] | tuple[int, ...] = (),
                 image_tokens: int | None = None) -> None:
        if num_units < 1:
            raise ValueError("the KV budget holds no block")
        self.num_layers, self.block_size = num_layers, block_size
        self.visual_layers = list(visual_layers)  # decoder layer index of each hyper layer
        self.hyper_index = {layer: h for h, layer in enumerate(self.visual_layers)}
        self.num_units = num_units
        self.image_tokens = image_tokens  # visual tokens per image (Owl3 hyper layers), None: no visual K/V
        # empty, not zeros: a host pool of a few GB is not touched until used; blocks are zeroed when handed out
        # slot-major ([.., slot, head, dim]): a gather of blocks is [rows, slots, heads, dim] by a view, and the
        # models' [rows, heads, slots, dim] by a transposed view: one copy per gather, no re-layout
        self.pool = torch.empty(num_units + 1, 2, block_size, kv_heads, head_dim, dtype=dtype, device=device)
        self.pool[0] = 0
        self._flat = self.pool.view(num_units + 1, 2, -1)
        self.unit_bytes = self.pool[0].numel() * self.pool.element_size()
        self._free = list(range(num_units, 0, -1))  # a stack; low ids first
        self.cached: dict[bytes, Block] = {}  # key -> registered block
        self.evictable: OrderedDict[Block, None] = OrderedDict()  # registered, unreferenced; oldest first
        self.evictable_units = 0

    # -- accounting ---------------------------------------------------------------------------------------
    def free_units(self) -> int:
        return len(self._free)

    def available(self) -> int:
        """Pool blocks that can be handed out now (free, or held only by the prefix cache)."""
        return len(self._free) + self.evictable_units

    def used_units(self) -> int:
        return self.num_units - self.available()

    def image_units(self) -> int:
        """Pool blocks one image's visual K/V take (all hyper layers)."""
        return len(self.visual_layers) * math.ceil((self.image_tokens or 0) / self.block_size)

    def gather(self, units: Tensor, kind: int) -> Tensor:
        """K (kind 0) or V (1) of pool blocks `units` [...] -> [..., block_size, kv_heads, D], one copy
        (index_select over flat rows: a few times faster than advanced indexing on CPU)."""
        out = self._flat[:, kind].index_select(0, units.reshape(-1))
        return out.view(*units.shape, *self.pool.shape[2:])

    # -- units --------------------------------------------------------------------------------------------
    def _take(self, n: int) -> Tensor:
        while len(self._free) < n and self.evictable:
            self._evict()
        if len(self._free) < n:
            raise MemoryError(f"{n} KV blocks asked, {len(self._free)} free")  # callers check available() first
        ids = [self._free.pop() for _ in range(n)]
        return torch.tensor(ids, dtype=torch.long)

    def _give(self, units: Tensor) -> None:
        self._free.extend(units.flatten().tolist())

    def _evict(self) -> None:
        block, _ = self.evictable.popitem(last=False)
        self.evictable_units -= block.num_units()
        del self.cached[block.key]
        block.key = None
        self._free_block(block)

    def _free_block(self, block: Block) -> None:
        self._give(block.units)
        for im in block.images:
            self._give(im.units)
        block.images = []

    # -- blocks -------------------------------------------------------------------------------------------
    def new_block(self) -> Block:
        """A text block (one pool block per layer), zeroed: the unused tail of a partial block is read
        (masked) by attention, so it must be finite."""
        units = self._take(self.num_layers)
        self.pool[units.to(self.pool.device)] = 0
        return Block(units, refs=1)

    def new_image(self) -> ImageKV:
        units = self._take(self.image_units())
        return ImageKV(units.view(len(self.visual_layers), -1))

    def free_image(self, image: ImageKV) -> None:
        """An image never attached to a block (its request left before the image was written)."""
        self._give(image.units)

    def acquire(self, block: Block) -> None:
        if block.refs == 0 and block in self.evictable:
            del self.evictable[block]
            self.evictable_units -= block.num_units()
        block.refs += 1

    def release(self, block: Block) -> None:
        block.refs -= 1
        if block.refs > 0:
            return
        if block.key is not None:  # stays cached for a later request with the same prefix
            self.evictable[block] = None
            self.evictable_units += block.num_units()
        else:
            self._free_block(block)

    def lookup(self, key: bytes) -> Block | None:
        return self.cached.get(key)

    def register(self, block: Block, key: bytes) -> None:
        """Make a full block shareable under `key` (content: the hash chain up to it). A second block with the
        same content stays private (freed when released)."""
        if block.key is None and key not in self.cached:
            block.key = key
            self.cached[key] = block


    def keep_partial(self, block: Block, key: bytes, tokens: list[int]) -> None:
        """Keep a leaving request's last, partly filled block under `key` (its parent's content key): a later
        request continuing the same tokens copies the common slots into a block of its own (it is never
        shared: its free slots would be written). Replaces an older one under the key that no one reads."""
        old = self.cached.get(key)
        if old is not None:
            if old.refs:
                return
            del self.evictable[old]
            self.evictable_units -= old.num_units()
            del self.cached[key]
            old.key = None
            self._free_block(old)
        if block.key is None:
            block.key, block.tokens = key, tuple(tokens)
            self.cached[key] = block

    def copy_slots(self, src: Block, dst: Block, n: int) -> None:
        """The first n slots of src into dst, every layer (a kept partly filled block's common part)."""
        self.pool[dst.units.to(self.pool.device), :, :n] = self.pool[src.units.to(self.pool.device), :, :n]


class PagedSeq:
    """One request's pages: its text blocks (slots 0.. in order), its images' visual K/V in order, how many
    slots are written (`length`) and the next RoPE position."""

    def __init__(self, manager: BlockManager) -> None:
        self.m = manager
        self.blocks: list[Block] = []
        self.images: list[ImageKV] = []  # written images, in placeholder order
        self.pending: list[ImageKV] = []  # images the next forward writes (set by the engine)
        self.reserved: list[ImageKV] = []  # images allocated for later chunks
        self.length = 0
        self.next_pos = 0
        # block and image tables, extended as blocks/images are added (both lists only grow): a decode step
        # does not rebuild a long request's table from its blocks
        self._table = torch.empty(manager.num_layers, 0, dtype=torch.long)
        self._img_table = torch.empty(len(manager.visual_layers), 0, 0, dtype=torch.long)

    def units(self) -> int:
        """Pool blocks this request references (shared ones included)."""
        return sum(b.num_units() for b in self.blocks) + sum(im.units.numel() for im in self.pending + self.reserved)

    def text_table(self, n: int) -> Tensor:
        """[num_layers, n] pool ids of the first n text blocks."""
        have = self._table.shape[1]
        if have < n:
            self._table = torch.cat([self._table] + [b.units[:, None] for b in self.blocks[have:n]], 1)
        return self._table[:, :n]

    def image_table(self) -> Tensor:
        """[hyper_layers, images, blocks_per_image] pool ids of the written images."""
        have = self._img_table.shape[1]
        if have < len(self.images):
            new = torch.stack([im.units for im in self.images[have:]], 1)
            self._img_table = new if not have else torch.cat([self._img_table, new], 1)
        return self._img_table

    def release(self) -> None:
        for b in self.blocks:
            self.m.release(b)
        for im in self.pending + self.reserved:
            self.m.free_image(im)
        self.blocks, self.images, self.pending, self.reserved = [], [], [], []


class PagedView:
    """The KVCache API over a batch of PagedSeqs for one forward (see the module note). Build it, run the model
    with `cache=view`; the model's commit() updates the rows' lengths and positions. The rows' blocks for the
    slots about to be written, and the new images' `pending` ImageKVs, must exist beforehand."""

    def __init__(self, manager: BlockManager, seqs: list[PagedSeq], keep: KeptKV | None = None) -> None:
        m = self.m = manager
        self.seqs = seqs
        bs = m.block_size
        dev = m.pool.device
        b = len(seqs)
        self.keep = keep
        self.key_valid: Tensor | None = None
        self._text_memo: tuple[int, Tensor, Tensor] | None = None
        self._visual_memo: tuple[int, Tensor, Tensor] | None = None
        self._new_text: dict[int, tuple[Tensor, Tensor]] = {}
        self._new_visual: dict[int, tuple[Tensor, Tensor]] = {}
        self._counts: list[int] | None = None  # new slots each row writes (set by begin)
        self._src: Tensor | None = None  # flat [B*lq] index of the new slots written (None: all of them)
        self._pack: Tensor | None = None  # [B, N] images of the joined layout (see append_images); None: cat
        self.next_pos = torch.tensor([s.next_pos for s in seqs], dtype=torch.long, device=dev)
        if keep is not None and any(s.pending for s in seqs):
            raise RuntimeError("kept K/V are for decode steps (no new images)")
        if keep is not None and keep.ready:  # the past is in the kept copy: no table, no gather
            if [s.length for s in seqs] != keep.lengths or [len(s.images) for s in seqs] != keep.nimg:
                raise RuntimeError("stale kept K/V: the rows changed since the copy was made")
            self.length, self._past_valid, self.image_pos = keep.used, keep.valid, keep.image_pos
            self._old_images = keep.vis // m.image_tokens if keep.vis else 0
            return
        self.nblk = [math.ceil(s.length / bs) for s in seqs]
        nmax = max(self.nblk)
        self.length = nmax * bs  # past slots of the padded layout (the model reads it before begin)
        table = torch.zeros(m.num_layers, b, nmax, dtype=torch.long)
        valid = torch.zeros(b, self.length, dtype=torch.bool)
        for r, s in enumerate(seqs):
            off = nmax - self.nblk[r]
            table[:, r, off:] = s.text_table(self.nblk[r])
            valid[r, off * bs : off * bs + s.length] = True
        self._table = table.to(dev)
        self._past_valid = valid.to(dev)
        # images: already written (gathered from the pool) + pending (written by this forward)
        nimg = [len(s.images) for s in seqs]
        self.image_pos: Tensor | None = None
        self._img_table = None
        if max(nimg) > 0:
            pos = torch.full((b, max(nimg)), BIG_POS, dtype=torch.long)
            tab = torch.zeros(len(m.visual_layers), b, max(nimg), m.image_units() // len(m.visual_layers),
                              dtype=torch.long)
            for r, s in enumerate(seqs):
                if s.images:
                    pos[r, : nimg[r]] = torch.tensor([im.pos for im in s.images])
                    tab[:, r, : nimg[r]] = s.image_table()
            self.image_pos = pos.to(dev)
            self._img_table = tab.to(dev)
        self._old_images = max(nimg)
        if keep is not None:
            keep.start(self)

    @property
    def has_visual(self) -> bool:
        return self.image_pos is not None

    # -- bookkeeping --------------------------------------------------------------------------------------
    def begin(self, new_valid: Tensor) -> None:
        """The new slots' validity [B, lq]. A batched prefill (rows of different chunk lengths) is left-padded:
        only the valid slots are written to the rows' blocks (row r's n_r valid slots go to its slots
        length..length + n_r), the padding slots are seen only through this forward's masked copy."""
        b, lq = new_valid.shape
        self.lq = lq
        self.key_valid = torch.cat([self._past_valid, new_valid.to(self._past_valid.device)], 1)
        bs = self.m.block_size
        dev = self.m.pool.device
        if lq == 1:  # a decode step: each row's one new slot (no per-row tensors: this runs every step)
            if not bool(new_valid.all()):
                raise ValueError("a paged decode step takes one new token per row")
            self._counts = [1] * b
            self._dst_units = torch.stack([s.blocks[s.length // bs].units for s in self.seqs], 1).to(dev)
            self._dst_off = torch.tensor([s.length % bs for s in self.seqs], dtype=torch.long, device=dev)
        else:
            valid = new_valid.cpu()
            self._counts = valid.sum(1).tolist()
            if sum(self._counts) < b * lq:
                self._src = valid.flatten().nonzero().squeeze(1).to(dev)
            units, offs = [], []
            for s, n in zip(self.seqs, self._counts):  # where each new slot goes: (block of the row, offset in it)
                slots = torch.arange(s.length, s.length + n)
                units.append(s.text_table(math.ceil((s.length + n) / bs))[:, slots // bs])  # [L, n]
                offs.append(slots % bs)
            self._dst_units = torch.cat(units, 1).to(dev)  # [L, sum n], row-major like k.transpose(1, 2)
            self._dst_off = torch.cat(offs).to(dev)
        if self.keep is not None and self.keep.used + lq > self.keep.cap:
            self.keep.regrow(self.keep.used + lq + self.keep.grow)

    def commit(self, lq: int, last_pos: Tensor) -> None:
        if self.keep is not None:
            self.keep.used += lq
            self.keep.valid = self.key_valid
            self.keep.lengths = [s.length + lq for s in self.seqs]
        last = last_pos.tolist()
        for r, s in enumerate(self.seqs):
            s.length += self._counts[r]
            s.next_pos = int(last[r]) + 1
            if s.pending:
                if self.image_pos is None or self.image_pos.shape[1] < len(s.images) + len(s.pending):
                    raise RuntimeError("the forward did not place the pending images")
                for j, im in enumerate(s.pending):
                    im.pos = int(self.image_pos[r, len(s.images) + j])
                s.images = s.images + s.pending
                s.pending = []

    # -- text ---------------------------------------------------------------------------------------------
    # Internally K/V are [B, slots, Hkv, D] (the pool's slot-major layout); the model gets [B, Hkv, slots, D]
    # as transposed views.
    def write_text(self, i: int, k: Tensor, v: Tensor) -> None:
        pool, u, o = self.m.pool, self._dst_units[i], self._dst_off
        b, h, lq, d = k.shape
        if self.keep is not None:  # appended to the kept copy too: the next step gathers nothing
            kk, kv, vis = self._kept(i)
            s = vis + self.keep.used
            kk[:, :, s : s + lq] = k
            kv[:, :, s : s + lq] = v
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, lq, Hkv, D]
        kf, vf = k.reshape(b * lq, h, d), v.reshape(b * lq, h, d)
        if self._src is not None:  # padded rows: their valid slots only
            kf, vf = kf.index_select(0, self._src), vf.index_select(0, self._src)
        pool[u, 0, o] = kf.to(pool.dtype)
        pool[u, 1, o] = vf.to(pool.dtype)
        if self.keep is not None:
            return
        self._new_text = {i: (k, v)}  # only this layer's are needed (text() right after)

    def _gather(self, table: Tensor, kind: int) -> Tensor:
        """table [B, n] pool ids -> [B, n * block_size, kv_heads, D] of K (kind 0) or V (1): one copy."""
        g = self.m.gather(table, kind)  # [B, n, bs, Hkv, D]
        b, n, bs, h, d = g.shape
        return g.view(b, n * bs, h, d)

    def _text_slots(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer i's past and new text K/V, [B, P + lq, Hkv, D]; one layer's copy kept at a time."""
        if self._text_memo is None or self._text_memo[0] != i:
            self._text_memo = None  # drop the previous layer's copy first
            k, v = self._new_text[i]
            self._text_memo = (i, torch.cat([self._gather(self._table[i], 0), k.to(self.m.pool.dtype)], 1),
                               torch.cat([self._gather(self._table[i], 1), v.to(self.m.pool.dtype)], 1))
        return self._text_memo[1], self._text_memo[2]

    def _kept(self, i: int) -> tuple[Tensor, Tensor, int]:
        """Layer i's kept buffers [B, Hkv, vis + cap, D] and its visual slots; gathered from the pool on first use.
        Head-major like KVCache's, not slot-major like the pool: the attention reads contiguous keys (on CPU,
        SDPA over the pool's transposed layout is measurably slower), and the re-layout is paid once."""
        kp = self.keep
        if kp.k[i] is None:
            vis = kp.vis if i in self.m.hyper_index else 0
            bufs = []
            _, _, h, d = self.m.pool.shape[1:]
            for kind in (0, 1):
                buf = self.m.pool.new_empty(kp.rows, h, vis + kp.cap, d)  # spare rows: for rows that join later
                b = len(self.seqs)
                if vis:
                    buf[:b, :, :vis] = self._old_visual(i, kind).transpose(1, 2)
                if kp.used:
                    buf[:b, :, vis : vis + kp.used] = self._gather(self._table[i], kind).transpose(1, 2)
                bufs.append(buf)
            kp.k[i], kp.v[i] = bufs
        b = len(kp.seqs)
        k, v = kp.k[i][:b], kp.v[i][:b]  # the rows in use (a view: contiguous)
        return k, v, k.shape[2] - kp.cap

    def text(self, i: int, lq: int) -> tuple[Tensor, Tensor]:
        if self.keep is not None:
            kk, kv, vis = self._kept(i)
            e = vis + self.keep.used + lq
            return kk[:, :, vis:e], kv[:, :, vis:e]
        k, v = self._text_slots(i)
        return k.transpose(1, 2), v.transpose(1, 2)

    # -- visual (Owl3 hyper layers) -----------------------------------------------------------------------
    def append_images(self, new_pos: Tensor, ragged: bool) -> Tensor:
        """image_pos after this forward's images (new_pos [B, N_new], each row's first len(pending), BIG_POS
        after) are appended: each row's old images then its new ones, back to back (visible images must be a
        prefix of a row's list), padded with BIG_POS. Rows with as many old images as the widest need no
        re-layout (a cat); otherwise `_pack` says which old/new image each entry is, for `_visual_slots`."""
        old = self.image_pos
        if old is None:
            return new_pos
        n_old = [len(s.images) for s in self.seqs]
        if min(n_old) == old.shape[1]:
            return torch.cat([old, new_pos], 1)
        no, nn = old.shape[1], new_pos.shape[1]
        n_new = [len(s.pending) for s in self.seqs]
        width = max(a + c for a, c in zip(n_old, n_new))
        pack = torch.full((len(self.seqs), width), no + nn, dtype=torch.long)  # the padding entry (after both)
        for r, (a, c) in enumerate(zip(n_old, n_new)):
            pack[r, :a] = torch.arange(a)
            pack[r, a : a + c] = torch.arange(no, no + c)
        self._pack = pack.to(old.device)
        pad = torch.full_like(old[:, :1], BIG_POS)
        return torch.cat([old, new_pos, pad], 1).gather(1, self._pack)

    def alloc_visual(self, i: int, shape: tuple[int, int, int, int], dtype: torch.dtype,
                     device: torch.device) -> tuple[Tensor, Tensor]:
        b, h, n, d = shape
        npend = max(len(s.pending) for s in self.seqs)
        if not npend or n != npend * self.m.image_tokens:
            raise RuntimeError("alloc_visual: the rows' pending images do not match the forward's")
        # slot-major storage handed out as the [B, Hkv, n, D] view the model fills
        k = torch.empty(b, n, h, d, dtype=dtype, device=device)
        v = torch.empty(b, n, h, d, dtype=dtype, device=device)
        self._new_visual = {i: (k, v)}
        return k.transpose(1, 2), v.transpose(1, 2)

    def _store_new_visual(self, i: int) -> tuple[Tensor, Tensor]:
        """Write layer i's new images' visual K/V (filled by the model since alloc_visual) into their blocks."""
        k, v = self._new_visual.pop(i)  # [B, n, Hkv, D]
        b, n, h, d = k.shape
        t, bs = self.m.image_tokens, self.m.block_size
        if n % t:
            raise RuntimeError(f"{n} visual slots are not whole images of {t} tokens")
        npend = n // t
        nb = math.ceil(t / bs)
        hi = self.m.hyper_index[i]
        units = torch.stack([im.units[hi] for s in self.seqs for im in s.pending]).to(self.m.pool.device)  # [P, nb]
        # the real images of the [B, npend] layout (row r's first len(pending)), row-major like `units`
        ragged = any(len(s.pending) != npend for s in self.seqs)
        real = torch.tensor([r * npend + j for r, s in enumerate(self.seqs) for j in range(len(s.pending))],
                            device=k.device) if ragged else None
        for kind, x in ((0, k), (1, v)):
            x = x.reshape(b * npend, t, h, d)
            if real is not None:
                x = x.index_select(0, real)
            if nb * bs != t:
                x = torch.cat([x, x.new_zeros(x.shape[0], nb * bs - t, h, d)], 1)
            self.m.pool[units, kind] = x.reshape(-1, nb, bs, h, d).to(self.m.pool.dtype)
        return k, v

    def _old_visual(self, i: int, kind: int) -> Tensor:
        """Layer i's K (kind 0) or V (1) of the images already written, [B, n_old * T, Hkv, D]: one gather."""
        tab = self._img_table[self.m.hyper_index[i]]  # [B, n_old, nb]
        b, n_old, nb = tab.shape
        t = self.m.image_tokens
        g = self.m.gather(tab, kind)  # [B, n_old, nb, bs, Hkv, D]
        bs, h, d = g.shape[3:]
        g = g.view(b, n_old, nb * bs, h, d)
        if nb * bs != t:
            g = g[:, :, :t]  # the last block's spare slots (a second copy when T is not a multiple)
        return g.reshape(b, n_old * t, h, d)

    def _visual_slots(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer i's visual K/V, [B, N_max * T, Hkv, D]: written images gathered, then this forward's new ones."""
        if self._visual_memo is not None and self._visual_memo[0] == i:
            return self._visual_memo[1], self._visual_memo[2]
        self._visual_memo = None
        new = self._store_new_visual(i) if i in self._new_visual else None
        parts_k, parts_v = [], []
        if self._old_images:
            parts_k.append(self._old_visual(i, 0))
            parts_v.append(self._old_visual(i, 1))
        if new is not None:
            parts_k.append(new[0])
            parts_v.append(new[1])
        if self._pack is not None:  # rows with fewer old images than others: each row's images back to back
            k, v = self._packed(parts_k), self._packed(parts_v)
        else:
            k = parts_k[0] if len(parts_k) == 1 else torch.cat(parts_k, 1)
            v = parts_v[0] if len(parts_v) == 1 else torch.cat(parts_v, 1)
        self._visual_memo = (i, k, v)
        return k, v

    def _packed(self, parts: list[Tensor]) -> Tensor:
        """[old ; new] visual K or V ([B, n * T, Hkv, D] each) -> the joined layout of `append_images`: one
        gather of whole images (a zero image for the padding entries)."""
        b, _, h, d = parts[0].shape
        t = self.m.image_tokens
        x = torch.cat(parts + [parts[0].new_zeros(b, t, h, d)], 1).view(b, -1, t * h * d)
        idx = self._pack[:, :, None].expand(-1, -1, t * h * d)
        return x.gather(1, idx).view(b, -1, h, d)

    def visual(self, i: int) -> tuple[Tensor, Tensor]:
        if self.keep is not None:
            kk, kv, vis = self._kept(i)
            return kk[:, :, :vis], kv[:, :, :vis]
        k, v = self._visual_slots(i)
        return k.transpose(1, 2), v.transpose(1, 2)

    def visual_and_text(self, i: int, lq: int) -> tuple[Tensor, Tensor, int]:
        if self.keep is not None:  # [visual ; text] is one buffer already: a view, no copy
            kk, kv, vis = self._kept(i)
            e = vis + self.keep.used + lq
            return kk[:, :, :e], kv[:, :, :e], 0
        vk, vv = self._visual_slots(i)
        tk, tv = self._text_slots(i)
        return torch.cat([vk, tk], 1).transpose(1, 2), torch.cat([vv, tv], 1).transpose(1, 2), 0


def row_capacity(rows: int) -> int:
    """Rows a kept copy's buffers have room for: a quarter (at least 2) more than it starts with, so requests
    that join the group later are added in place (KeptKV.add)."""
    return rows + max(2, rows // 4)


class KeptKV:
    """A decode group's gathered K/V kept across its decode steps (see the module note): per layer one buffer
    [rows, Hkv, vis + cap, D] whose first B rows are in use, the rows' visual K/V (hyper layers; images back to
    back, as the view gathers them) then their text slots, the gathered past followed by every later step's new
    K/V. Valid only for the same rows (`seqs`, the same PagedSeq objects) at the lengths and image counts it
    recorded; the engine matches it by `rows_of`, `remove`s rows that left (in place: the last row moves into
    the hole) and `add`s rows that joined (in place: one row's gather, if they fit the copy's layout; else it
    builds a new copy). A preempted request comes back with a new PagedSeq, so its old row is never read.
    Built by the first PagedView that uses it (one ordinary gather per layer)."""

    def __init__(self, manager: BlockManager, seqs: list[PagedSeq], grow: int) -> None:
        self.m = manager
        self.rows = row_capacity(len(seqs))
        self.seqs = list(seqs)  # strong references: identities stay unique while the copy lives
        self.grow = max(1, grow)  # text slots added when the buffers fill up
        self.lengths = [s.length for s in seqs]  # what the next step's rows must have
        self.nimg = [len(s.images) for s in seqs]
        self.k: list[Tensor | None] = [None] * manager.num_layers
        self.v: list[Tensor | None] = [None] * manager.num_layers
        self.used = self.cap = self.vis = 0
        self.valid: Tensor | None = None  # [B, used] key validity of the kept text slots
        self.image_pos: Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.valid is not None

    @staticmethod
    def size(manager: BlockManager, rows: int, text: int, vis: int) -> int:
        """Bytes of the buffers for `rows` rows of `text` text slots and `vis` visual slots (hyper layers)."""
        slot = manager.unit_bytes // manager.block_size  # K and V of one slot in one layer
        return rows * (manager.num_layers * text + len(manager.visual_layers) * vis) * slot

    @classmethod
    def estimate(cls, manager: BlockManager, seqs: list[PagedSeq], grow: int) -> int:
        """Bytes a new copy for these rows takes (the view's padded layout plus `grow` text slots)."""
        bs = manager.block_size
        text = max(math.ceil(s.length / bs) for s in seqs) * bs + max(1, grow)
        return cls.size(manager, row_capacity(len(seqs)), text,
                        max(len(s.images) for s in seqs) * (manager.image_tokens or 0))

    def nbytes(self) -> int:
        """Bytes of the buffers allocated so far."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def nbytes_next(self, lq: int = 1) -> int:
        """Bytes after the next step (the buffers regrow when full)."""
        cap = self.cap if self.used + lq <= self.cap else self.used + lq + self.grow
        return self.size(self.m, self.rows, cap, self.vis)

    def start(self, view: PagedView) -> None:
        """Take the layout of the view that builds the copy (its gathered past, its images)."""
        self.used, self.valid, self.image_pos = view.length, view._past_valid, view.image_pos
        self.cap = self.used + self.grow
        self.vis = view._old_images * (self.m.image_tokens or 0)

    def regrow(self, cap: int) -> None:
        for bufs in (self.k, self.v):
            for i, t in enumerate(bufs):
                if t is not None:
                    keep = t.shape[2] - self.cap + self.used  # visual + filled text slots
                    new = t.new_empty(*t.shape[:2], t.shape[2] - self.cap + cap, t.shape[3])
                    new[:, :, :keep] = t[:, :, :keep]
                    bufs[i] = new
        self.cap = cap

    def rows_of(self, seqs: list[PagedSeq]) -> list[int | None]:
        """Where each of `seqs` is in this copy; None for one that is not in it (joined, preempted: a new
        PagedSeq) or whose length or image count changed since (its row is stale)."""
        pos = {id(s): r for r, s in enumerate(self.seqs)}
        rows: list[int | None] = []
        for s in seqs:
            r = pos.get(id(s))
            rows.append(None if r is None or self.lengths[r] != s.length or self.nimg[r] != len(s.images) else r)
        return rows

    def remove(self, rows: list[int]) -> None:
        """Drop these rows in place: each is overwritten by the current last row (one row's copy per layer), so
        a request that leaves costs one row, not a copy of the whole group."""
        for r in sorted(set(rows), reverse=True):
            last = len(self.seqs) - 1
            if r != last:
                for t in self.k + self.v:
                    if t is not None:
                        t[r] = t[last]
                for small in (self.valid, self.image_pos):
                    if small is not None:
                        small[r] = small[last]
                self.seqs[r], self.lengths[r], self.nimg[r] = self.seqs[last], self.lengths[last], self.nimg[last]
            self.seqs.pop(), self.lengths.pop(), self.nimg.pop()
        b = len(self.seqs)
        self.valid = None if self.valid is None else self.valid[:b]
        self.image_pos = None if self.image_pos is None else self.image_pos[:b]

    def fits(self, seqs: list[PagedSeq]) -> bool:
        """Whether `add` can take these rows: free rows, each row's text blocks within the kept past (right-
        aligned, as the view lays rows out) and its images within the kept visual slots."""
        bs, t = self.m.block_size, self.m.image_tokens or 0
        return (self.ready and all(x is not None for x in self.k) and len(self.seqs) + len(seqs) <= self.rows
                and all(not s.pending and math.ceil(s.length / bs) * bs <= self.used and len(s.images) * t <= self.vis
                        for s in seqs))

    def add(self, seqs: list[PagedSeq]) -> None:
        """Append rows in place (`fits` first): each row's past gathered from the pool into a free row of every
        layer's buffer, laid out as the view would (text right-aligned to the kept past, images from slot 0),
        the rest zeroed (read masked: must be finite)."""
        m, bs, t = self.m, self.m.block_size, self.m.image_tokens or 0
        dev = m.pool.device
        _, _, h, d = m.pool.shape[1:]
        for s in seqs:
            r, nblk, n = len(self.seqs), math.ceil(s.length / bs), len(s.images)
            off = self.used - nblk * bs
            table = s.text_table(nblk).to(dev)
            img = s.image_table().to(dev) if n else None
            for i in range(m.num_layers):
                vis = self.vis if i in m.hyper_index else 0
                for kind, bufs in ((0, self.k), (1, self.v)):
                    row = bufs[i][r]  # [Hkv, vis + cap, D]
                    row[:, n * t if vis else 0 : vis + off].zero_()
                    if nblk:
                        row[:, vis + off : vis + self.used] = m.gather(table[i], kind).view(nblk * bs, h, d).transpose(0, 1)
                    if vis and n:
                        g = m.gather(img[m.hyper_index[i]], kind)  # [n, nb, bs, Hkv, D]
                        g = g.view(n, -1, h, d)[:, :t].reshape(n * t, h, d)
                        row[:, : n * t] = g.transpose(0, 1)
            valid = torch.zeros(1, self.used, dtype=torch.bool, device=dev)
            valid[0, off : off + s.length] = True
            self.valid = torch.cat([self.valid, valid])
            if self.image_pos is not None:
                pos = torch.full((1, self.image_pos.shape[1]), BIG_POS, dtype=torch.long)
                if n:
                    pos[0, :n] = torch.tensor([im.pos for im in s.images])
                self.image_pos = torch.cat([self.image_pos, pos.to(dev)])
            self.seqs.append(s), self.lengths.append(s.length), self.nimg.append(n)

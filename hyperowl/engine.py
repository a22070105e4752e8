"""Generation engine: prefill + decode loop outside the model. Knows token ids, never a tokenizer.

Design note: the engine takes token ids and image *features* (made by the encoding stage, encoder.py),
never pixels or files. A batch of requests is left-padded into one prefill; each request's visual K/V
are written once into the KVCache by the hyper layers, and every decode step feeds one token
per live row. Finished rows are dropped from the cache (`KVCache.reorder`), so the batch shrinks instead
of computing padding. Sampling is a plain function of logits (greedy when temperature == 0; else
temperature, top-k, top-p), with an HF-compatible repetition penalty over prompt + generated ids.
`stream` yields (row, token) events as they are produced; `generate` collects them. A request may carry a
grammar (`Request.constraint`, structured.py: its mask before sampling) and ask for logprobs
(`SamplingParams.logprobs`: the event's `.logprobs`, from the raw logits; `token_logprobs`). `score` gives the
log probabilities of given continuations of prompts (likelihood scoring of multiple-choice answers), by the
same definition (`raw_logprobs`).

Cancellation: a request may carry a `threading.Event`; once it is set (by any thread, e.g. a server whose
client went away) the row is dropped at the next decode step like a finished one, freeing its cache rows.

Fault isolation: everything that belongs to one row is checked or built per row *before* the shared
prefill: `SamplingParams` refuses a seed outside 64 bits, `Engine.check` a request whose token ids or
image features cannot go through the model, and `Engine.generator` makes the row's seeded generator (a
caller may pass it in `Request.generator`, so that a row re-run apart after a failed batch continues the
same random stream; the server's scheduler does, see serve/scheduler.py).
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from .encoder import encode_pixels
from .limits import SEED_RANGE
from .processing.processor import collate
from .structured import advance, mask_logits

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 1024
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    seed: int | None = None
    logprobs: int | None = None  # None: none; n >= 0: the chosen token's logprob and the n most likely (`TokenLogprobs`)

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
             f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} (64 bits), got {self.seed}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class Request:
    """One prompt: token ids [L], and its images' features [N, T, H] (from the encoder) with the token index
    of each image's placeholder [N]."""

    input_ids: Tensor
    image_embeds: Tensor | None = None
    image_positions: Tensor | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    cancel: threading.Event | None = None  # set from any thread: the row leaves the batch at the next step
    generator: torch.Generator | None = None  # the row's random stream (sampling rows); None: made from params.seed
    pixel_values: Tensor | None = None  # deprecated: pass image_embeds (hyperowl.encoder makes them)
    # one content hash per image (its features: source bytes + preprocessing), for prefix reuse across requests
    # in the continuous engine (batching.py); None: blocks holding an image are not shared
    media_hashes: tuple[str, ...] | None = None
    # a grammar (structured.Constraint, made by the caller, who knows the tokenizer): its mask is applied to the
    # row's logits before sampling and it advances with each chosen token; stops only where the grammar ends
    constraint: object | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log probability and the `n` most likely tokens of its step, [(id, logprob)] sorted
    by logprob (descending). Logprobs are the model's: log_softmax of the raw logits, before the repetition
    penalty, a grammar mask, temperature, top-k and top-p (vLLM's default "raw" logprobs)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class TokenEvent(tuple):
    """(request index, token id), as `Engine.stream` yields them; `.logprobs` a `TokenLogprobs` when the
    request asked (SamplingParams.logprobs), else None."""

    logprobs: TokenLogprobs | None = None


def raw_logprobs(logits: Tensor) -> Tensor:
    """The model's log probabilities: log_softmax of the raw logits in float32 (before the repetition penalty,
    a grammar mask, temperature, top-k, top-p). The one definition behind the logprobs the sampler reports
    and `Engine.score`."""
    return torch.log_softmax(logits.float(), -1)


def token_logprobs(logprobs: Tensor, tokens: list[int], ns: list[int | None]) -> list[TokenLogprobs | None]:
    """Per row: the chosen token's logprob and the top ns[row] (None: the row did not ask); logprobs [B, V]
    (log_softmax of the logits the step sampled from). One top-k over the rows that ask, one copy to the host."""
    k = max((n for n in ns if n is not None), default=0)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    top_v, top_i = (logprobs.topk(k, -1) if k else (logprobs[:, :0], logprobs[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return [None if n is None else TokenLogprobs(t, c, tuple(zip(ti[:n], tv[:n])))
            for t, c, n, tv, ti in zip(tokens, chosen, ns, top_v, top_i)]


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """logits [B, V]; seen [B, V] bool; penalty [B]. HF rule: divide positive scores, multiply negative."""
    p = penalty[:, None].to(logits.dtype)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def sampling_probs(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    """The distribution each row draws from, [B, V] in vocabulary order: softmax of logits / temperature
    (greedy rows: temperature 1) over the top-k tokens, then top-p on that: the smallest prefix of the
    sorted tokens whose mass reaches top_p, so the token that crosses the threshold is kept."""
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], device=dev)
    top_k = torch.tensor([p.top_k or logits.shape[-1] for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    scaled = logits / torch.where(temp > 0, temp, 1.0)[:, None]
    sorted_logits, order = scaled.sort(-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=dev)[None]
    sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    # A token goes when the mass before it already reaches top_p. top_p = 1 is off: float32 sums over a large
    # vocabulary pass 1 before its end, which dropped the tail (23878 of 150000 random-logit tokens).
    drop = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
    probs = probs.masked_fill(drop, 0.0)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, order, probs)


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> Tensor:
    """Next token per row from logits [B, V] (float32), all rows at once.

    Greedy rows take the argmax. Sampling rows draw from `sampling_probs` (temperature, top-k, top-p) by an
    exponential race (argmax of p / E, E ~ Exp(1), one E per vocabulary token), which is an exact draw from
    p and lets each row use its own seeded generator.
    """
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], device=dev)
    greedy = logits.argmax(-1)
    if bool((temp == 0).all()):
        return greedy
    probs = sampling_probs(logits, params)
    noise = torch.stack([torch.empty(logits.shape[-1], device=dev).exponential_(generator=g) for g in generators
                         ]) if len(generators) else probs
    choice = (probs / noise).argmax(-1)
    return torch.where(temp == 0, greedy, choice)


def next_tokens(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                constraints: list, produced: list[int], seen: Tensor | None = None,
                penalty: Tensor | None = None) -> tuple[Tensor, list[int], list[TokenLogprobs | None]]:
    """One decode step's choice for every row, the same in both engines: logprobs of the raw logits (rows that
    ask), the repetition penalty (when `seen` [B, V] is given), stops forbidden until min_new_tokens (`produced`:
    tokens each row made so far), the grammar masks, the draw, the grammars advanced. logits [B, V] float32 are
    changed in place. Returns the tokens as a tensor and a list, and each row's logprobs (None: not asked)."""
    asks = [p.logprobs for p in params]
    lp = raw_logprobs(logits) if any(n is not None for n in asks) else None  # the model's, raw
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, penalty)
    for row, (p, n) in enumerate(zip(params, produced)):
        if n < p.min_new_tokens and p.stop_token_ids:
            logits[row, list(p.stop_token_ids)] = float("-inf")
    mask_logits(logits, constraints)
    tokens = sample(logits, params, generators)
    toks = tokens.tolist()
    advance(constraints, toks)
    return tokens, toks, token_logprobs(lp, toks, asks) if lp is not None else [None] * len(toks)


def _event(r: int, t: int, lp: TokenLogprobs | None) -> TokenEvent:
    e = TokenEvent((r, t))
    if lp is not None:
        e.logprobs = lp
    return e


def _cancelled(request: Request) -> bool:
    return request.cancel is not None and request.cancel.is_set()


class Engine:
    def __init__(self, model) -> None:
        self.model = model

    def _with_features(self, r: Request) -> Request:
        """Earlier versions took pixels: those are handed to the encoding stage once (with a warning)."""
        if r.pixel_values is None or r.image_embeds is not None:
            return r
        warnings.warn("Request(pixel_values=...) is deprecated: pass image_embeds (features from "
                      "hyperowl.encoder, e.g. pipeline.encoder.encode(plan))", DeprecationWarning, stacklevel=3)
        return dataclasses.replace(r, image_embeds=encode_pixels(self.model, r.pixel_values), pixel_values=None)

    def check(self, r: Request, index: int = 0) -> None:
        """ValueError naming request `index` if it cannot go through the model (before it joins a batch)."""
        ids = r.input_ids
        if ids.ndim != 1 or ids.numel() == 0:
            raise ValueError(f"request {index}: input_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
        vocab = getattr(self.model.config, "vocab_size", None)  # (negative ids: Owl2 takes the official -200)
        if vocab is not None and int(ids.max()) >= vocab:
            raise ValueError(f"request {index}: token id {int(ids.max())} is outside the vocabulary (0..{vocab - 1})")
        n = 0 if r.image_positions is None else int(r.image_positions.numel())
        got = 0 if r.image_embeds is None else int(r.image_embeds.shape[0])
        if n != got:
            raise ValueError(f"request {index}: {got} image features for {n} image positions")

    def generator(self, params: SamplingParams) -> torch.Generator | None:
        """The row's seeded generator (None for greedy rows); a row without a seed gets a random one."""
        if params.temperature <= 0:
            return None
        g = torch.Generator(device=self.model.device)
        g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**31, (1,))))
        return g

    def _collate(self, requests: list[Request]) -> dict:
        """Left-padded model inputs; the rows' image features concatenated in row order."""
        dev = self.model.device
        for i, r in enumerate(requests):
            self.check(r, i)
        batch = collate(requests, pad_id=0)
        feats = [r.image_embeds.to(dev) for r in requests if r.image_embeds is not None and r.image_embeds.shape[0]]
        embeds = (feats[0] if len(feats) == 1 else torch.cat(feats)) if feats else None
        return dict(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev), image_embeds=embeds,
                    image_positions=batch.image_positions.to(dev) if embeds is not None else None)

    @torch.no_grad()
    def stream(self, requests: list[Request]) -> Iterator[list[tuple[int, int]]]:
        """Yield, per decode step, the (request index, token id) pairs produced by live rows."""
        if not requests:
            return
        requests = [self._with_features(r) for r in requests]
        params = [r.params for r in requests]
        batch = self._collate(requests)
        b, length = batch["input_ids"].shape
        max_new = max(p.max_new_tokens for p in params)
        cache = self.model.new_cache(length + min(max_new, 256))
        vocab = self.model.config.vocab_size
        dev = self.model.device
        seen = torch.zeros(b, vocab, dtype=torch.bool, device=dev)
        use_penalty = any(p.repetition_penalty != 1.0 for p in params)
        if use_penalty:
            # Only real prompt tokens are marked: a scatter of the mask would also write False from padding
            # onto the pad id, in an order torch leaves undefined on GPU (a prompt's own pad-id token lost).
            ids = batch["input_ids"]
            real = batch["attention_mask"].bool() & (ids >= 0) & (ids < vocab)
            rows = torch.arange(b, device=dev)[:, None].expand_as(ids)
            seen[rows[real], ids[real]] = True
        penalty = torch.tensor([p.repetition_penalty for p in params], device=dev)
        gens = [r.generator if r.generator is not None or r.params.temperature <= 0 else self.generator(r.params)
                for r in requests]

        live = list(range(b))  # request index of each cache row
        counts = [0] * b
        logits = self.model(**batch, cache=cache, last_logits_only=True).logits[:, -1].float()
        while live:
            tokens, toks, lps = next_tokens(logits, [params[r] for r in live], [gens[r] for r in live],
                                            [requests[r].constraint for r in live], [counts[r] for r in live],
                                            seen if use_penalty else None, penalty)
            yield [_event(r, t, x) for r, t, x in zip(live, toks, lps)]
            keep = []
            for row, (r, t) in enumerate(zip(live, toks)):
                counts[r] += 1
                if counts[r] < params[r].max_new_tokens and t not in params[r].stop_token_ids \
                        and not _cancelled(requests[r]):
                    keep.append(row)
            if use_penalty:
                seen[torch.arange(len(live), device=dev), tokens] = True
            if not keep:
                return
            if len(keep) < len(live):  # drop finished rows from every per-row tensor
                rows = torch.tensor(keep, device=dev)
                cache.reorder(rows)
                tokens, seen, penalty = tokens[rows], seen[rows], penalty[rows]
                live = [live[i] for i in keep]
            logits = self.model(tokens[:, None], cache=cache).logits[:, -1].float()

    @torch.no_grad()
    def score(self, requests: list[Request], continuations: list[list[list[int]]]) -> list[list[list[float]]]:
        """Log probabilities (`raw_logprobs`) of given continuations of each prompt: per request, per
        continuation (token ids), one value per token. Sampling params and constraints are not used.

        The prompts are prefilled once, in one left-padded batch (each prompt's visual K/V written once). Each
        continuation's first token is read from its prompt's last logits, so single-token continuations (option
        letters) cost that one forward. For longer ones the prompt's cache rows are repeated, one per
        continuation (a copy of the K/V, never a recomputation of them or of the images), and every
        continuation goes through one right-padded forward on that cache."""
        if len(continuations) != len(requests):
            raise ValueError(f"{len(continuations)} continuation lists for {len(requests)} requests")
        vocab = self.model.config.vocab_size
        for i, conts in enumerate(continuations):
            for c in conts:
                if not c or min(c) < 0 or max(c) >= vocab:
                    raise ValueError(f"request {i}: a continuation must be a non-empty list of token ids in "
                                     f"0..{vocab - 1}, got {c}")
        if not requests:
            return []
        requests = [self._with_features(r) for r in requests]
        batch = self._collate(requests)
        dev = self.model.device
        longer = [(r, j) for r, cs in enumerate(continuations) for j, c in enumerate(cs) if len(c) > 1]
        extra = max((len(continuations[r][j]) - 1 for r, j in longer), default=0)
        cache = self.model.new_cache(batch["input_ids"].shape[1] + extra)
        first = raw_logprobs(self.model(**batch, cache=cache, last_logits_only=True).logits[:, -1])
        rows = torch.tensor([r for r, cs in enumerate(continuations) for _ in cs], dtype=torch.long, device=dev)
        heads = iter(first[rows, torch.tensor([c[0] for cs in continuations for c in cs], dtype=torch.long,
                                              device=dev)].tolist())
        out = [[[next(heads)] for _ in cs] for cs in continuations]
        if not longer:
            return out
        cache.reorder(torch.tensor([r for r, _ in longer], device=dev))
        ids = torch.zeros(len(longer), extra, dtype=torch.long, device=dev)
        valid = torch.zeros(len(longer), extra, dtype=torch.long, device=dev)
        for k, (r, j) in enumerate(longer):  # the continuation without its last token: its logits predict the rest
            c = continuations[r][j]
            ids[k, : len(c) - 1] = torch.tensor(c[:-1], device=dev)
            valid[k, : len(c) - 1] = 1
        lp = raw_logprobs(self.model(ids, attention_mask=valid, cache=cache).logits)
        for k, (r, j) in enumerate(longer):
            c = continuations[r][j]
            target = torch.tensor(c[1:], device=dev)
            out[r][j] += lp[k, torch.arange(len(c) - 1, device=dev), target].tolist()
        return out

    def generate(self, requests: list[Request]) -> list[list[int]]:
        """New token ids per request (stop token included when one was produced)."""
        out: list[list[int]] = [[] for _ in requests]
        for events in self.stream(requests):
            for r, t in events:
                out[r].append(t)
        return out

"""Batched log-likelihood scoring: per-token log-probabilities and greedy flags of token continuations.

A request is a token sequence and how many of its last tokens to score, each given the tokens before it.
By default requests are packed best-fit-decreasing into rows (`pack_rows`), each request its own segment
with positions from 0, so a row holds several requests and attention never crosses them (blockwise
attention skips the blocks between them): a request opens a row of `pack_length` positions (or of the
longest request's bucket when that is shorter), or of its length bucket (`buckets.length_buckets`) when
longer, and shorter requests fill the room left in any row, and the empty rows a longer bucket's last batch
runs anyway before rows of their own. With pack=False each request gets a row of its own length bucket.
Rows are split into batches of a fixed row count (padded with ignored rows to a multiple of the mesh's
data x fsdp size) and scored by one jit program per (rows, length).

The output head runs only where a token is scored: per data shard, the batch's scored positions are
gathered to the front (`compact_order`) and the head runs `chunk` of them at a time, skipping the chunks
past them, so no more than (shards, chunk, V) float32 logits exist at once.

Long documents are split by `rolling_windows` (the rolling rule, stated there).

Axis letters: B rows, T positions, G row groups (data shards), N = B / G * T positions of a group,
c chunk, D model dim, V vocab.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mistral_jax.runtime import distributed
from mistral_jax.model import transformer as model_lib
from mistral_jax.model import packing
from mistral_jax.model import sharding
from mistral_jax.inference.buckets import bucket_for, length_buckets
from mistral_jax.inference.head import chunk_logits, from_chunks, to_chunks
from mistral_jax.model.config import ModelConfig

Dtype = Any
Request = tuple[Sequence[int], int]      # (tokens, n_score): score the last n_score tokens of `tokens`


@dataclasses.dataclass(frozen=True)
class Scored:
    """Per scored token: float32 log-probability and whether it is the argmax of its distribution."""
    logprobs: np.ndarray   # (n_score,) float32
    greedy: np.ndarray     # (n_score,) bool

    @property
    def total(self) -> float:
        """Summed log-likelihood of the scored tokens."""
        return float(np.sum(self.logprobs, dtype=np.float64))

    @property
    def is_greedy(self) -> bool:
        """True when every scored token is its position's argmax (greedy decoding would produce it)."""
        return bool(np.all(self.greedy))


def _chunk_scores(h_BcD: jax.Array, w_DV: jax.Array, targets_Bc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log-prob (B, c) float32, is-argmax (B, c)) of the targets under logits h @ w (w may be packed)."""
    logits_BcV = chunk_logits(h_BcD, w_DV)
    m_Bc = jnp.max(logits_BcV, axis=-1)
    lse_Bc = m_Bc + jnp.log(jnp.sum(jnp.exp(logits_BcV - m_Bc[..., None]), axis=-1))
    # a gather, not a one-hot sum over V: 12% faster for the whole head on CPU, identical values
    tgt_Bc = jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1)[..., 0]
    # the target is jnp.argmax (the first maximum) iff it is a maximum and no earlier token is one: two
    # plain reductions sharing the max, where argmax's (value, index) reduction took a third of the head.
    # (decode.first_argmax(logits) == target states the same rule but recomputes the max: its head ran 8%
    # slower at (4, 512, 32000) on a 2-core Xeon, 2026-12-05. Only NaN logits tell the two apart.)
    earlier_max = jnp.any((logits_BcV == m_Bc[..., None])
                          & (jax.lax.broadcasted_iota(targets_Bc.dtype, logits_BcV.shape, 2) < targets_Bc[..., None]),
                          axis=-1)
    return tgt_Bc - lse_Bc, (tgt_Bc == m_Bc) & ~earlier_max


def chunked_logprob_greedy(h_BTD: jax.Array, w_DV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array,
                           chunk: int = 512) -> tuple[jax.Array, jax.Array]:
    """Float32 log-probabilities (B, T) of `targets_BT` under logits `h_BTD @ w_DV` and whether each target is
    the argmax (first maximum, as `jnp.argmax`), computed `chunk` positions at a time.

    Chunks where `mask_BT` is False in every row are skipped (their outputs are 0 / False); values at
    other unmasked positions are computed but not meaningful to the caller.
    """
    if chunk < 1:
        raise ValueError(f"chunked_logprob_greedy: chunk must be >= 1, got {chunk}")
    T = h_BTD.shape[1]

    def body(x):
        h_BcD, t_Bc, m_Bc = x
        skip = lambda: (jnp.zeros(t_Bc.shape, jnp.float32), jnp.zeros(t_Bc.shape, bool))  # noqa: E731
        return jax.lax.cond(jnp.any(m_Bc), lambda: _chunk_scores(h_BcD, w_DV, t_Bc), skip)

    lp_nBc, gr_nBc = jax.lax.map(body, tuple(to_chunks(x, chunk) for x in (h_BTD, targets_BT, mask_BT)))
    return from_chunks(lp_nBc, T), from_chunks(gr_nBc, T)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "chunk", "attn_block", "mesh"))
def _score_batch(params, inputs_BT, pos_BT, seg_BT, order_GN, targets_GN, mask_GN, *, cfg: ModelConfig,
                 dtype: Dtype, chunk: int, attn_block: int, mesh: Mesh | None):
    """(log-prob, is-argmax), each (G, N), at the positions `order_GN` picks from each of the G row groups
    (one per data shard, N = B / G * T positions each, flattened row-major); 0 / False where mask_GN is off.

    The host orders each group's scored positions first (`compact_order`), so the head's chunks past them
    are all masked and skipped: the head runs at scored positions only, whatever rows they are in.
    """
    G, N = order_GN.shape
    with sharding.with_rules(mesh):
        h_BTD, _ = model_lib.Transformer(cfg, dtype=dtype, attn_block=attn_block).apply(
            {"params": params}, inputs_BT, pos_BT, seg_BT, return_hidden=True)
        h_GND = jnp.take_along_axis(h_BTD.reshape(G, N, h_BTD.shape[-1]), order_GN[..., None], axis=1)
        lp_GN, greedy_GN = chunked_logprob_greedy(h_GND, params["output"], targets_GN, mask_GN, chunk)
    return jnp.where(mask_GN, lp_GN, 0.0), greedy_GN & mask_GN


def compact_order(mask_GN: np.ndarray) -> np.ndarray:
    """Per row group, a permutation (G, N) int32 of its positions: the masked-on ones first, each part in
    index order."""
    return np.argsort(~mask_GN, axis=1, kind="stable").astype(np.int32)


def pack_rows(lengths: Sequence[int], capacity: Callable[[int], int]) -> list[list[int]]:
    """Indices of `lengths` packed best-fit-decreasing into rows: an item goes into the open row with the
    least room that holds it, else opens a row of `capacity(length)` (>= length) positions. Returns the
    rows, each listing its items longest first; the room of row r is capacity(its first item's length)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []           # (room left, row), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            cap = capacity(n)
            if not 0 < n <= cap:
                raise ValueError(f"pack_rows: length {n} of item {i} is not in [1, {cap}]")
            rows.append([i])
            bisect.insort(free, (cap - n, len(rows) - 1))
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
    return rows


def check_request(tokens: Sequence[int], n_score: int, cfg: ModelConfig, max_input: int) -> None:
    """Raises ValueError (one line) unless the request can be scored with inputs of at most max_input tokens."""
    if isinstance(n_score, bool) or not isinstance(n_score, (int, np.integer)) or n_score < 1:
        raise ValueError(f"nothing to score: {n_score!r} continuation tokens")
    if n_score > len(tokens) - 1:
        raise ValueError(f"{n_score} tokens to score need at least {n_score + 1} tokens, got {len(tokens)}")
    if len(tokens) - 1 > max_input:
        raise ValueError(f"{len(tokens)} tokens need {len(tokens) - 1} input positions, more than the evaluation "
                         f"context of {max_input}")
    bad = [int(t) for t in tokens if not 0 <= int(t) < cfg.vocab_size]
    if bad:
        raise ValueError(f"token id(s) {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")


class Scorer:
    """Scores (tokens, n_score) requests with a model's params, batched in padded length buckets.

    max_input: the evaluation context, the most tokens fed in one pass (default cfg.max_seq_len);
    buckets are `length_buckets(max_input, smallest)`. batch_size: rows per batch, rounded up to a
    multiple of the mesh's data x fsdp size (rows beyond the requests are ignored filler), so each
    bucket compiles one program. shrink_partial: a bucket's last, partly filled batch runs with the
    smallest power-of-two multiple of the data x fsdp size that holds it instead (less padding when a
    bucket has few requests; at most 1 + log2(rows) programs per bucket). pack: requests share rows as
    separate segments in rows of at least pack_length positions (see the module docstring). chunk:
    output-head chunk in scored positions per data shard. attn_block: the blockwise attention block (model
    default 512).
    """

    def __init__(self, params: Any, cfg: ModelConfig, *, mesh: Mesh | None = None, dtype: Dtype = jnp.float32,
                 batch_size: int = 8, max_input: int | None = None, smallest_bucket: int = 64, chunk: int = 512,
                 shrink_partial: bool = True, pack: bool = True, pack_length: int = 256,
                 attn_block: int = 256):
        for name, v in (("batch_size", batch_size), ("smallest_bucket", smallest_bucket), ("chunk", chunk),
                        ("pack_length", pack_length), ("attn_block", attn_block)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Scorer: {name} must be an integer >= 1, got {v!r}")
        max_input = cfg.max_seq_len if max_input is None else max_input
        if isinstance(max_input, bool) or not isinstance(max_input, int) or not 1 <= max_input <= cfg.max_seq_len:
            raise ValueError(f"Scorer: max_input must be an integer in [1, max_seq_len={cfg.max_seq_len}], "
                             f"got {max_input!r}")
        self.cfg, self.mesh, self.dtype, self.chunk = cfg, mesh, jnp.dtype(dtype), chunk
        self.max_input = max_input
        self.buckets = length_buckets(max_input, min(smallest_bucket, max_input))
        shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        self.rows = -(-batch_size // shards) * shards
        self.shards, self.shrink_partial, self.pack = shards, shrink_partial, pack
        self.pack_length = bucket_for(min(pack_length, max_input), self.buckets)
        self.attn_block = attn_block
        if mesh is not None:
            params = jax.device_put(params, model_lib.param_shardings(cfg, mesh))
        self.params = packing.pack(params)
        self.used_buckets: set[int] = set()
        self.used_shapes: set[tuple[int, int]] = set()   # (rows, bucket) of every batch run
        self.positions_run = 0                             # rows x length of every batch run, padding included

    def score(self, requests: Sequence[Request],
              on_batch: Callable[[list[int], list[Scored], int], None] | None = None) -> list[Scored]:
        """Scores every request; returns results in request order.

        Requests are checked first (ValueError naming the request index). on_batch(indices, results,
        n_tokens) is called after each batch with the request indices it finished and the input tokens it
        ran (padding excluded).
        """
        reqs = [(list(map(int, t)), int(n)) for t, n in requests]
        for i, (t, n) in enumerate(reqs):
            try:
                check_request(t, n, self.cfg, self.max_input)
            except ValueError as e:
                raise ValueError(f"Scorer.score: request {i}: {e}") from None
        out: list[Scored | None] = [None] * len(reqs)
        lengths = [len(t) - 1 for t, _ in reqs]
        by_bucket: dict[int, list[list[int]]] = {}       # bucket -> rows, each a list of request indices
        if self.pack and reqs:     # check_request: every request feeds at least one position
            for T, row in self._packed_rows(lengths):
                by_bucket.setdefault(T, []).append(row)
        else:
            for i in sorted(range(len(reqs)), key=lambda i: -lengths[i]):
                by_bucket.setdefault(bucket_for(lengths[i], self.buckets), []).append([i])
        for T, rows in sorted(by_bucket.items(), reverse=True):
            self.used_buckets.add(T)
            for s in range(0, len(rows), self.rows):
                batch = rows[s:s + self.rows]
                n_rows = self.rows_for(len(batch))
                self.used_shapes.add((n_rows, T))
                self.positions_run += n_rows * T
                results = self._run(T, [[reqs[i] for i in row] for row in batch], n_rows)
                done = [i for row in batch for i in row]
                for i, r in zip(done, results):
                    out[i] = r
                if on_batch is not None:
                    on_batch(done, results, sum(lengths[i] for i in done))
        return out  # type: ignore[return-value]

    def _packed_rows(self, lengths: list[int]) -> list[tuple[int, list[int]]]:
        """(row length, request indices) of every packed row.

        Rows are no longer than the longest request needs (short requests alone get short rows). A
        length's last batch may run empty rows (`rows_for` rounds its row count up); short requests
        fill such rows before opening rows of their own, since those positions run anyway.
        """
        plen = min(self.pack_length, bucket_for(max(lengths), self.buckets))
        own = lambda n: max(plen, bucket_for(n, self.buckets))  # noqa: E731
        rows = pack_rows(lengths, own)
        count = collections.Counter(own(lengths[row[0]]) for row in rows)
        spare = {T: self.rows_for(k % self.rows) - k % self.rows
                 for T, k in count.items() if T > plen and k % self.rows}
        opened: list[int] = []

        def cap(n: int) -> int:
            T = own(n)
            if T == plen:
                T = next((L for L in sorted(spare, reverse=True) if spare[L] > 0), plen)
                if T != plen:
                    spare[T] -= 1
            opened.append(T)
            return T

        if any(spare.values()):
            rows = pack_rows(lengths, cap)
        else:
            opened = [own(lengths[row[0]]) for row in rows]
        return list(zip(opened, rows))

    def rows_for(self, n: int) -> int:
        """Rows of the batch that runs n requests (see shrink_partial)."""
        if not self.shrink_partial or n >= self.rows:
            return self.rows
        r = self.shards
        while r < n:
            r *= 2
        return min(r, self.rows)

    def _run(self, T: int, batch: list[list[tuple[list[int], int]]], rows: int) -> list[Scored]:
        """Scores rows of requests (each row's requests packed as segments 1, 2, ...); results in row order."""
        inputs = np.zeros((rows, T), np.int32)
        targets = np.zeros((rows, T), np.int32)
        mask = np.zeros((rows, T), bool)
        pos = np.zeros((rows, T), np.int32)
        seg = np.zeros((rows, T), np.int32)      # 0: padding
        spans = []
        for r, row in enumerate(batch):
            o = 0
            for k, (t, n) in enumerate(row, 1):
                L = len(t) - 1
                inputs[r, o:o + L] = t[:-1]
                targets[r, o:o + L] = t[1:]
                mask[r, o + L - n:o + L] = True
                pos[r, o:o + L] = np.arange(L)
                seg[r, o:o + L] = k
                spans.append((r, o + L - n, o + L))
                o += L
        G = self.shards
        mask_GN = mask.reshape(G, -1)
        order_GN = compact_order(mask_GN)
        picked = [np.take_along_axis(a.reshape(G, -1), order_GN, axis=1) for a in (targets, mask_GN)]
        host = [inputs, pos, seg, order_GN] + picked
        if self.mesh is None:
            arrays = [jnp.asarray(a) for a in host]
        else:   # every process holds the whole batch and places its own devices' rows (row groups)
            arrays = [distributed.global_array(a, sharding.batch_sharding(self.mesh, 2)) for a in host]
        lp_GN, gr_GN = _score_batch(self.params, *arrays, cfg=self.cfg, dtype=self.dtype, chunk=self.chunk,
                                    attn_block=self.attn_block, mesh=self.mesh)
        lp, gr = np.zeros((G, mask_GN.shape[1]), np.float32), np.zeros(mask_GN.shape, bool)
        np.put_along_axis(lp, order_GN, distributed.to_host(lp_GN), axis=1)
        np.put_along_axis(gr, order_GN, distributed.to_host(gr_GN), axis=1)
        lp, gr = lp.reshape(rows, T), gr.reshape(rows, T)
        return [Scored(lp[r, a:b].copy(), gr[r, a:b].copy()) for r, a, b in spans]


@dataclasses.dataclass(frozen=True)
class Window:
    """One pass of the rolling rule: feed tokens[start:end] and score its last n_score tokens."""
    start: int
    end: int
    n_score: int


def default_overlap(cfg: ModelConfig, max_input: int) -> int:
    """The default rolling overlap: the sliding window W (capped at max_input // 2), or max_input // 2."""
    half = max(1, max_input // 2)
    return min(cfg.sliding_window, half) if cfg.sliding_window else half


def rolling_windows(n_tokens: int, max_input: int, overlap: int) -> list[Window]:
    """Windows that score tokens 1 .. n_tokens-1 of a sequence exactly once (token 0 is BOS or a prefix).

    Rule: a window feeds at most max_input tokens. The first window is tokens[0 : min(n, max_input+1)] and
    scores all of its targets. Each later window scores the next max_input + 1 - overlap targets (fewer at
    the end) and is right-aligned to a full max_input + 1 tokens ending at its last target, so its first
    scored target has at least `overlap` tokens of context (the last window, ending at the document's end,
    may have more). With overlap >= the sliding window W, every scored token's first-layer attention sees
    exactly the W keys it sees in one pass over the whole document. overlap 1 is lm-evaluation-harness's
    rolling rule (disjoint prediction windows).
    """
    if not 1 <= overlap <= max_input:
        raise ValueError(f"rolling_windows: overlap must be in [1, max_input={max_input}], got {overlap}")
    if n_tokens < 2:
        return []
    end = min(n_tokens, max_input + 1)
    wins = [Window(0, end, end - 1)]
    while end < n_tokens:
        new_end = min(n_tokens, end + max_input + 1 - overlap)
        wins.append(Window(max(0, new_end - max_input - 1), new_end, new_end - end))
        end = new_end
    return wins


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% (by default) Wilson score interval for k successes in n trials; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)

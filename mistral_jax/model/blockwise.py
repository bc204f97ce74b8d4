"""Blockwise (flash-style) grouped-query attention whose mask comes from positions and segment ids.

Queries and keys are cut into blocks; each query block runs an online softmax over the key blocks,
and a key block that no query of the block can see (judged from the blocks' positions and segment
ids, so the same code serves packed training rows, chunked prefill over a cache, and ragged padded
batches) is skipped with `lax.cond`. With a sliding window W only about (W + block) / block key
blocks per query block do work, so time is O(T * W) and memory O(T) instead of O(T * S). The
backward pass is a custom VJP that recomputes block scores from the saved log-sum-exp.

A self-attention row that fits in one block is instead covered by squares on and below the diagonal
(`_pieces`), without a loop: the masked-out upper triangle is not computed, so (1 + 2**-L) / 2 of the
T x T scores are, with L = `split_levels(T)` halvings.

Axes: B batch, T queries, S keys, N / K query / kv heads, G = N / K, H head dim, Q / C query / key block sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mistral_jax.model.mask import attention_mask
from mistral_jax.model.projection import merged_einsum

_NEG = -1e30  # finite "minus infinity" for masked logits and the running max
MAX_LEVELS = 3  # at most 3 halvings of a one-block self-attention row's causal triangle (`_pieces`) ...
MIN_SIDE = 32   # ... while its smallest squares keep a side of at least 32 (each level costs compile time)


def _reachable(qpos_BQ, kpos_BC, window, qseg_BQ=None, kseg_BC=None):
    """Scalar bool: can any query of the block see any key of the block?

    Bounds from positions (a key is visible only if 0 <= k <= q and q - k < window) and, with segment
    ids, from their ranges (a query sees only keys of its own segment, so the two blocks' ranges of ids
    must overlap): packed rows skip the blocks between different documents.
    """
    q_valid = qpos_BQ >= 0
    k_valid = kpos_BC >= 0
    big = jnp.iinfo(jnp.int32).max
    qmax_B = jnp.max(jnp.where(q_valid, qpos_BQ, -1), axis=1)
    qmin_B = jnp.min(jnp.where(q_valid, qpos_BQ, big), axis=1)
    kmin_B = jnp.min(jnp.where(k_valid, kpos_BC, big), axis=1)
    kmax_B = jnp.max(jnp.where(k_valid, kpos_BC, -1), axis=1)
    ok_B = (kmin_B <= qmax_B) & (kmax_B >= 0) & (qmax_B >= 0)
    if window is not None:
        ok_B &= kmax_B > qmin_B - window
    if qseg_BQ is not None:
        ok_B &= (jnp.maximum(jnp.min(qseg_BQ, axis=1), jnp.min(kseg_BC, axis=1))
                 <= jnp.minimum(jnp.max(qseg_BQ, axis=1), jnp.max(kseg_BC, axis=1)))
    return jnp.any(ok_B)


def _blocks(x, n, size):
    """(B, n*size, ...) -> (n, B, size, ...)."""
    return x.reshape(x.shape[0], n, size, *x.shape[2:]).swapaxes(0, 1)


def _unblocks(x):
    """(n, B, size, ...) -> (B, n*size, ...)."""
    x = x.swapaxes(0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _pad(x, length, value):
    extra = length - x.shape[1]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _take(blocks, j):
    """Block j of a stacked (n, B, size, ...) array (None passes through)."""
    return None if blocks is None else jax.lax.dynamic_index_in_dim(blocks, j, axis=0, keepdims=False)


def _band(n_inner: int, outer: int, inner: int, reach: int | None, band: bool):
    """(static iteration count, first key block of query block i).

    With `band` (self-attention rows, whose keys are the queries themselves in index order) query block
    i reaches key blocks [i*Q - (W-1), i*Q + Q), at most ceil((Q + W - 1) / C) + 1 of them; without a
    window, or without `band`, every key block is visited (unreachable ones skipped by position).
    """
    if not band or reach is None:
        return n_inner, lambda i: jnp.int32(0)
    n = min(n_inner, -(-(outer + reach - 1) // inner) + 1)
    return n, lambda i: jnp.maximum(0, (i * outer - (reach - 1)) // inner)


def _score_probs(q_BQKGH, k_BCKH, qpos_BQ, kpos_BC, qseg_BQ, kseg_BC, window, lse_BKGQ, scale):
    """Masked probabilities (B, K, G, Q, C) = exp(scores - lse), zero where the mask is off."""
    s = jnp.einsum("bqkgh,bckh->bkgqc", q_BQKGH, k_BCKH, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(qpos_BQ, kpos_BC, window, qseg_BQ, kseg_BC)[:, None, None]
    return jnp.where(mask, jnp.exp(s - lse_BKGQ[..., None]), 0.0)


def _forward(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, window, bq, bk, band):
    """(out (B, T, K, G, H) in q's dtype, lse (B, K, G, T) float32); T % bq == S % bk == 0."""
    # Tie the positions and segment ids to q in the dataflow: inside a differentiated outer loop (the
    # scanned layers), values computed from loop-invariant inputs alone are hoisted out of the loop by
    # JAX's partial evaluation, which would materialise every block's mask at once (O(T * W) memory).
    q_BTKGH, qpos_BT, kpos_BS, qseg_BT, kseg_BS = jax.lax.optimization_barrier(
        (q_BTKGH, qpos_BT, kpos_BS, qseg_BT, kseg_BS))
    B, T, K, G, H = q_BTKGH.shape
    S = k_BSKH.shape[1]
    nq, nk = T // bq, S // bk
    scale = H ** -0.5
    # blocks laid out as the block products read them, (B, K) leading, once per call instead of per block
    kb, vb = (jnp.swapaxes(_blocks(x, nk, bk), 2, 3) for x in (k_BSKH, v_BSKH))     # (nk, B, K, C, H)
    kposb = _blocks(kpos_BS, nk, bk)
    ksegb = None if kseg_BS is None else _blocks(kseg_BS, nk, bk)
    n_iter, first = _band(nk, bq, bk, window, band)

    def q_block(_, xs):
        q_BKGQH, qpos_BQ, qseg_BQ, i = xs

        def k_block(carry, t):
            j = first(i) + t
            jc = jnp.minimum(j, nk - 1)
            k_BKCH, v_BKCH, kpos_BC, kseg_BC = _take(kb, jc), _take(vb, jc), _take(kposb, jc), _take(ksegb, jc)

            def visit(carry):
                o_BKGQH, m_BKGQ, l_BKGQ = carry
                s_BKGQC = jnp.einsum("bkgqh,bkch->bkgqc", q_BKGQH, k_BKCH,
                                     preferred_element_type=jnp.float32) * scale
                mask_B11QC = attention_mask(qpos_BQ, kpos_BC, window, qseg_BQ, kseg_BC)[:, None, None]
                s_BKGQC = jnp.where(mask_B11QC, s_BKGQC, _NEG)
                m_new = jnp.maximum(m_BKGQ, jnp.max(s_BKGQC, axis=-1))
                # masked scores are _NEG, so exp gives exactly 0 there once a row has seen a key; a row that
                # has seen none subtracts 0 instead of its _NEG max (a small select, not one per score)
                p_BKGQC = jnp.exp(s_BKGQC - jnp.where(m_new > _NEG, m_new, 0.0)[..., None])
                alpha = jnp.exp(m_BKGQ - m_new)
                l_new = l_BKGQ * alpha + jnp.sum(p_BKGQC, axis=-1)
                pv = jnp.einsum("bkgqc,bkch->bkgqh", p_BKGQC.astype(v_BKCH.dtype), v_BKCH,
                                preferred_element_type=jnp.float32)
                return o_BKGQH * alpha[..., None] + pv, m_new, l_new

            go = (j < nk) & _reachable(qpos_BQ, kpos_BC, window, qseg_BQ, kseg_BC)
            return jax.lax.cond(go, visit, lambda c: c, carry), None

        init = (jnp.zeros((B, K, G, bq, H), jnp.float32), jnp.full((B, K, G, bq), _NEG, jnp.float32),
                jnp.zeros((B, K, G, bq), jnp.float32))
        (o, m, l), _ = jax.lax.scan(k_block, init, jnp.arange(n_iter, dtype=jnp.int32))
        safe_l = jnp.where(l > 0, l, 1.0)
        out_BQKGH = jnp.einsum("bkgqh->bqkgh", o / safe_l[..., None]).astype(q_BTKGH.dtype)
        lse_BKGQ = jnp.where(l > 0, m + jnp.log(safe_l), jnp.inf)  # inf: no key visible, p = 0 everywhere
        return None, (out_BQKGH, lse_BKGQ)

    xs = (jnp.transpose(_blocks(q_BTKGH, nq, bq), (0, 1, 3, 4, 2, 5)), _blocks(qpos_BT, nq, bq),
          None if qseg_BT is None else _blocks(qseg_BT, nq, bq), jnp.arange(nq, dtype=jnp.int32))
    _, (out, lse) = jax.lax.scan(q_block, None, xs)
    return _unblocks(out), jnp.moveaxis(lse, 0, 3).reshape(B, K, G, T)


def _backward(q_BTKGH, k_BSKH, v_BSKH, qpos_BT, kpos_BS, qseg_BT, kseg_BS, window, bq, bk, band, out, lse, dout):
    """(dq, dk, dv) in one pass over query blocks, visiting the key blocks in reach and recomputing
    probabilities from the saved log-sum-exp; dk and dv accumulate block by block."""
    B, T, K, G, H = q_BTKGH.shape
    S = k_BSKH.shape[1]
    nq, nk = T // bq, S // bk
    scale = H ** -0.5
    f32 = jnp.float32
    # D_i = sum_h dO * O, the softmax-gradient correction per query row.
    delta_BKGT = jnp.einsum("btkgh,btkgh->bkgt", dout.astype(f32), out.astype(f32))

    def lse_blocks(x_BKGT):
        return jnp.moveaxis(x_BKGT.reshape(B, K, G, nq, bq), 3, 0)

    qb, qposb, dob = _blocks(q_BTKGH, nq, bq), _blocks(qpos_BT, nq, bq), _blocks(dout, nq, bq)
    qsegb = None if qseg_BT is None else _blocks(qseg_BT, nq, bq)
    lseb, deltab = lse_blocks(lse), lse_blocks(delta_BKGT)
    kb, vb, kposb = _blocks(k_BSKH, nk, bk), _blocks(v_BSKH, nk, bk), _blocks(kpos_BS, nk, bk)
    ksegb = None if kseg_BS is None else _blocks(kseg_BS, nk, bk)

    def ds_of(q_BQKGH, do_BQKGH, lse_BKGQ, delta_BKGQ, qpos_BQ, qseg_BQ, k_BCKH, v_BCKH, kpos_BC, kseg_BC):
        p = _score_probs(q_BQKGH, k_BCKH, qpos_BQ, kpos_BC, qseg_BQ, kseg_BC, window, lse_BKGQ, scale)
        dp = jnp.einsum("bqkgh,bckh->bkgqc", do_BQKGH.astype(f32), v_BCKH.astype(f32))
        return p, p * (dp - delta_BKGQ[..., None]) * scale

    n_iter, first = _band(nk, bq, bk, window, band)

    def q_block(carry, i):
        q, do, lse_i, delta_i, qpos, qseg = (_take(qb, i), _take(dob, i), _take(lseb, i), _take(deltab, i),
                                             _take(qposb, i), _take(qsegb, i))

        def step(carry, t):
            dq_BQKGH, dk_BSKH, dv_BSKH = carry
            j = first(i) + t
            jc = jnp.minimum(j, nk - 1)
            k, v, kpos, kseg = _take(kb, jc), _take(vb, jc), _take(kposb, jc), _take(ksegb, jc)

            def visit(_):
                p, ds = ds_of(q, do, lse_i, delta_i, qpos, qseg, k, v, kpos, kseg)
                return (jnp.einsum("bkgqc,bckh->bqkgh", ds, k.astype(f32)),
                        jnp.einsum("bkgqc,bqkgh->bckh", ds, q.astype(f32)),
                        jnp.einsum("bkgqc,bqkgh->bckh", p, do.astype(f32)))

            def skip(_):
                return jnp.zeros(q.shape, f32), jnp.zeros(k.shape, f32), jnp.zeros(k.shape, f32)

            # the branches return block-sized updates only; the full-size dk/dv are updated outside
            dq_add, dk_j, dv_j = jax.lax.cond((j < nk) & _reachable(qpos, kpos, window, qseg, kseg),
                                              visit, skip, None)
            at = (0, jc * bk, 0, 0)
            dk_BSKH = jax.lax.dynamic_update_slice(dk_BSKH, jax.lax.dynamic_slice(dk_BSKH, at, k.shape) + dk_j, at)
            dv_BSKH = jax.lax.dynamic_update_slice(dv_BSKH, jax.lax.dynamic_slice(dv_BSKH, at, k.shape) + dv_j, at)
            return (dq_BQKGH + dq_add, dk_BSKH, dv_BSKH), None

        dk_BSKH, dv_BSKH = carry
        (dq, dk_BSKH, dv_BSKH), _ = jax.lax.scan(step, (jnp.zeros(q.shape, f32), dk_BSKH, dv_BSKH),
                                                 jnp.arange(n_iter, dtype=jnp.int32))
        return (dk_BSKH, dv_BSKH), dq

    zeros = jnp.zeros((B, S, K, H), f32)
    (dk, dv), dq = jax.lax.scan(q_block, (zeros, zeros), jnp.arange(nq, dtype=jnp.int32))
    return _unblocks(dq).astype(q_BTKGH.dtype), dk.astype(k_BSKH.dtype), dv.astype(v_BSKH.dtype)


# ----- one-block self-attention rows: the causal triangle covered by squares -----
# The row (T = 2**L * b after padding) is covered by the 2**L diagonal b x b squares and, at each
# level l = 1..L, the 2**(l-1) squares of side s = T / 2**l where the second half of a 2s-long
# stretch of queries sees the first half of its keys. Keys after a query, by index, are never in a
# square (self-attention rows: positions count up by one with the index within a segment, so such keys
# are masked anyway). Each level is one batched einsum over its n squares (axis letter n), with no loop
# (compile time and XLA's cost analysis both see straight-line code), and (1 + 2**-L) / 2 of the T x T
# scores are computed instead of all of them.

def split_levels(T: int) -> int:
    """Halvings L of a one-block self-attention row of T positions: up to MAX_LEVELS, squares >= MIN_SIDE."""
    L = 0
    while L < MAX_LEVELS and T >= MIN_SIDE << (L + 1):
        L += 1
    return L


def _pieces(T: int, side: int):
    """(level, n squares, side) of the cover of a row of T = 2**L * side positions; level 0 is the diagonal."""
    L = (T // side).bit_length() - 1
    return [(0, 2 ** L, side)] + [(lvl, 2 ** (lvl - 1), T >> lvl) for lvl in range(1, L + 1)]


def _rows(x, level, n, side):
    """The query rows of a level's squares: (B, T, ...) -> (B, n, side, ...)."""
    return x.reshape(x.shape[0], n, side, *x.shape[2:]) if level == 0 else \
        x.reshape(x.shape[0], n, 2, side, *x.shape[2:])[:, :, 1]


def _cols(x, level, n, side):
    """The key columns of a level's squares: (B, T, ...) -> (B, n, side, ...)."""
    return x.reshape(x.shape[0], n, side, *x.shape[2:]) if level == 0 else \
        x.reshape(x.shape[0], n, 2, side, *x.shape[2:])[:, :, 0]


def _full(x, level, fill, rows=True):
    """Inverse of `_rows` (or `_cols`): (B, n, side, ...) -> (B, T, ...), `fill` where the level has none."""
    B, n, side = x.shape[:3]
    if level != 0:
        pad = jnp.full_like(x, fill)
        x = jnp.stack([pad, x] if rows else [x, pad], axis=2)
    return x.reshape(B, -1, *x.shape[(3 if level == 0 else 4):])


def _square_mask(qpos, kpos, qseg, kseg, window, level, n, side):
    """(B, n, side, 1, 1, side) mask of a level's squares."""
    B = qpos.shape[0]
    flat = lambda x, f: None if x is None else f(x, level, n, side).reshape(B * n, side)  # noqa: E731
    m = attention_mask(flat(qpos, _rows), flat(kpos, _cols), window, flat(qseg, _rows), flat(kseg, _cols))
    return m.reshape(B, n, side, 1, 1, side)


def _qrows(x, level, n, side):
    """`_rows` with (K, G) moved before the query axis, as the products read them: (B, n, K, G, side, ...)."""
    return jnp.moveaxis(_rows(x, level, n, side), 2, 4)


def _kcols(x, level, n, side):
    """`_cols` of keys or values with K moved before the key axis: (B, n, K, side, H)."""
    return jnp.swapaxes(_cols(x, level, n, side), 2, 3)


def _split_forward(q_BTKGH, k_BTKH, v_BTKH, qpos_BT, kpos_BT, qseg_BT, kseg_BT, window, b):
    """(out (B, T, K, G, H) in q's dtype, lse (B, T, K, G) float32) over the squares of `_pieces` (diagonal
    squares of side b)."""
    q_BTKGH, qpos_BT, kpos_BT, qseg_BT, kseg_BT = jax.lax.optimization_barrier(  # see `_forward`
        (q_BTKGH, qpos_BT, kpos_BT, qseg_BT, kseg_BT))
    B = q_BTKGH.shape[0]
    scale = q_BTKGH.shape[-1] ** -0.5
    parts = []
    for level, n, side in _pieces(q_BTKGH.shape[1], b):
        s = jnp.einsum("bnkgqh,bnkch->bnkgqc", _qrows(q_BTKGH, level, n, side), _kcols(k_BTKH, level, n, side),
                       preferred_element_type=jnp.float32) * scale
        mask = _square_mask(qpos_BT, kpos_BT, qseg_BT, kseg_BT, window, level, n, side).reshape(B, n, 1, 1, side, side)
        s = jnp.where(mask, s, _NEG)
        m = jnp.max(s, axis=-1)
        p = jnp.exp(s - jnp.where(m > _NEG, m, 0.0)[..., None])   # 0 where masked: see `_forward`
        o = jnp.einsum("bnkgqc,bnkch->bnkgqh", p.astype(v_BTKH.dtype), _kcols(v_BTKH, level, n, side),
                       preferred_element_type=jnp.float32)
        parts.append(tuple(_full(jnp.moveaxis(x, 4, 2), level, fill)   # m, l, o back to (B, T, K, G, ...)
                           for x, fill in ((m, _NEG), (jnp.sum(p, axis=-1), 0.0), (o, 0.0))))
    m_BTKG = functools.reduce(jnp.maximum, [m for m, _, _ in parts])
    l_BTKG = sum(l * jnp.exp(m - m_BTKG) for m, l, _ in parts)
    o_BTKGH = sum(o * jnp.exp(m - m_BTKG)[..., None] for m, _, o in parts)
    safe_l = jnp.where(l_BTKG > 0, l_BTKG, 1.0)
    lse_BTKG = jnp.where(l_BTKG > 0, m_BTKG + jnp.log(safe_l), jnp.inf)  # inf: no key visible
    return (o_BTKGH / safe_l[..., None]).astype(q_BTKGH.dtype), lse_BTKG


def _split_backward(q_BTKGH, k_BTKH, v_BTKH, qpos_BT, kpos_BT, qseg_BT, kseg_BT, window, b, out, lse_BTKG, dout):
    """(dq, dk, dv) of `_split_forward`, recomputing each square's probabilities from the saved lse."""
    B = q_BTKGH.shape[0]
    scale = q_BTKGH.shape[-1] ** -0.5
    f32 = jnp.float32
    delta_BTKG = jnp.einsum("btkgh,btkgh->btkg", dout.astype(f32), out.astype(f32))
    dq = dk = dv = 0.0
    for level, n, side in _pieces(q_BTKGH.shape[1], b):
        rows = lambda x: _qrows(x, level, n, side)  # noqa: E731
        key_rows = lambda x: _full(jnp.swapaxes(x, 2, 3), level, 0.0, rows=False)  # noqa: E731  (B, T, K, H)
        q, do = rows(q_BTKGH), rows(dout).astype(f32)
        k, v = _kcols(k_BTKH, level, n, side), _kcols(v_BTKH, level, n, side).astype(f32)
        mask = _square_mask(qpos_BT, kpos_BT, qseg_BT, kseg_BT, window, level, n, side).reshape(B, n, 1, 1, side, side)
        s = jnp.einsum("bnkgqh,bnkch->bnkgqc", q, k, preferred_element_type=f32) * scale
        p = jnp.where(mask, jnp.exp(s - rows(lse_BTKG)[..., None]), 0.0)
        dp = jnp.einsum("bnkgqh,bnkch->bnkgqc", do, v)
        ds = p * (dp - rows(delta_BTKG)[..., None]) * scale
        dq = dq + _full(jnp.moveaxis(jnp.einsum("bnkgqc,bnkch->bnkgqh", ds, k.astype(f32)), 4, 2), level, 0.0)
        dk = dk + key_rows(merged_einsum("bnkgqc,bnkgqh->bnkch", ds, q.astype(f32)))
        dv = dv + key_rows(merged_einsum("bnkgqc,bnkgqh->bnkch", p, do))
    return dq.astype(q_BTKGH.dtype), dk.astype(k_BTKH.dtype), dv.astype(v_BTKH.dtype)


def _run_forward(q, k, v, qpos, kpos, qseg, kseg, window, bq, bk, band):
    """band == "split": `_split_forward` (a one-block self-attention row of 2**L squares of side bq);
    else `_forward`."""
    if band == "split":
        return _split_forward(q, k, v, qpos, kpos, qseg, kseg, window, bq)
    return _forward(q, k, v, qpos, kpos, qseg, kseg, window, bq, bk, band)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attend(q, k, v, qpos, kpos, qseg, kseg, window, bq, bk, band):
    return _run_forward(q, k, v, qpos, kpos, qseg, kseg, window, bq, bk, band)[0]


def _attend_fwd(q, k, v, qpos, kpos, qseg, kseg, window, bq, bk, band):
    out, lse = _run_forward(q, k, v, qpos, kpos, qseg, kseg, window, bq, bk, band)
    return out, (q, k, v, qpos, kpos, qseg, kseg, out, lse)


def _attend_bwd(window, bq, bk, band, res, dout):
    q, k, v, qpos, kpos, qseg, kseg, out, lse = res
    if band == "split":
        dq, dk, dv = _split_backward(q, k, v, qpos, kpos, qseg, kseg, window, bq, out, lse, dout)
    else:
        dq, dk, dv = _backward(q, k, v, qpos, kpos, qseg, kseg, window, bq, bk, band, out, lse, dout)
    return dq, dk, dv, None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def blockwise_attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_pos_BT: jax.Array,
                     k_pos_BS: jax.Array, window: int | None = None, q_seg_BT: jax.Array | None = None,
                     k_seg_BS: jax.Array | None = None, block_q: int = 512, block_k: int = 512,
                     self_attention: bool = False) -> jax.Array:
    """Attention output (B, T, N, H) under the position/segment mask of `mask.attention_mask`.

    Equals `attention.attend(q, k, v, attention_mask(...))` for every query that sees at least one
    key; a query that sees none (padding) gets zeros. Logits, softmax and accumulation are float32.
    `self_attention`: the keys are the queries' own row, positions counting up by one within each
    segment (training rows, packed or not); then each block visits only the blocks in index reach of
    the window, a static count, instead of testing every block, and a row of at most one block is
    covered by squares on and below the diagonal (`_pieces`: no loop, no masked upper triangle).
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if N % K:
        raise ValueError(f"blockwise_attend: {N} query heads not divisible by {K} kv heads")
    if (q_seg_BT is None) != (k_seg_BS is None):
        raise ValueError("blockwise_attend: give segment ids for both queries and keys, or for neither")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"blockwise_attend: block sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    if self_attention and T != S:
        raise ValueError(f"blockwise_attend: self_attention needs as many keys as queries, got T={T}, S={S}")
    bq, bk = min(block_q, T), min(block_k, S)
    band: bool | str = bool(self_attention)
    if self_attention and T <= block_q and S <= block_k:  # one block: the triangle's squares (`_pieces`)
        n = 2 ** split_levels(T)
        bq = bk = -(-T // n)
        band = "split"
    Tp, Sp = (n * bq,) * 2 if band == "split" else (-(-T // bq) * bq, -(-S // bk) * bk)
    q = _pad(q_BTNH.reshape(B, T, K, N // K, H), Tp, 0)
    k, v = _pad(k_BSKH, Sp, 0), _pad(v_BSKH, Sp, 0)
    qpos, kpos = _pad(q_pos_BT.astype(jnp.int32), Tp, -1), _pad(k_pos_BS.astype(jnp.int32), Sp, -1)
    qseg = None if q_seg_BT is None else _pad(q_seg_BT.astype(jnp.int32), Tp, -1)
    kseg = None if k_seg_BS is None else _pad(k_seg_BS.astype(jnp.int32), Sp, -2)
    out = _attend(q, k, v, qpos, kpos, qseg, kseg, window, bq, bk, band)
    return out[:, :T].reshape(B, T, N, H)

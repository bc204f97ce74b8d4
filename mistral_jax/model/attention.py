"""Grouped-query attention with a mask computed from query/key positions (and segment ids).

One function serves training, chunked prefill and cached decode: keys carry their absolute
positions (-1 marks an empty cache slot or padding), and the mask falls out of them.

Implementations behind `multihead_attention`, all under the same position/segment mask: "dense"
(the full masked score tensor; the test oracle), "blockwise" (pure JAX, key blocks visited by reach;
any positions), "xla" (`jax.nn.dot_product_attention` given the mask of `attention_mask` explicitly,
never its index-based `is_causal`/`local_window_size`, which would ignore positions and padding; any
positions) and, for self-attention over rows whose positions count up by one within each segment
(training and evaluation rows, packed or not, padded anywhere with position -1), "splash" (Pallas TPU
splash attention with a local mask by index; runs in interpret mode elsewhere), and "cudnn" (cuDNN's fused
attention through `jax.nn.dot_product_attention`, given the same explicit mask; NVIDIA GPUs, bfloat16 or
float16). "auto" picks, for self-attention rows: splash on TPU; on GPU cudnn for bfloat16/float16 with head
dim <= 128, else xla without segment ids; blockwise otherwise and for every cached (decode) call.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mistral_jax.model.blockwise import blockwise_attend
from mistral_jax.model.mask import attention_mask

IMPLS = ("auto", "dense", "blockwise", "splash", "xla", "cudnn")
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))   # what cuDNN's fused attention takes


def attend(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Softmax attention (float32 logits and softmax); N query heads share K kv heads. Returns (B, T, N, H).

    A query whose mask is empty (a padding position) gets a finite, meaningless output.
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    if N % K:
        raise ValueError(f"attend: {N} query heads not divisible by {K} kv heads")
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * (H ** -0.5)
    logits_BKGTS = jnp.where(mask_BTS[:, None, None, :, :], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


def resolve_impl(impl: str, self_attention: bool, has_segments: bool, backend: str | None = None,
                 dtype: Any = None, head_dim: int | None = None) -> str:
    """The implementation `impl` ("auto" or a name in IMPLS) stands for on this backend and call (dtype and
    head_dim: of the queries; without them "auto" does not pick cudnn)."""
    if impl not in IMPLS:
        raise ValueError(f"attention implementation must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if self_attention and backend == "tpu":
        return "splash"
    if self_attention and backend == "gpu":
        # measured on an H200 (bench/device_check.py, BENCHMARKS.md): 3x xla and 3-10x blockwise at 16K tokens
        if dtype is not None and jnp.dtype(dtype) in CUDNN_DTYPES and head_dim is not None and head_dim <= 128:
            return "cudnn"
        if not has_segments:
            return "xla"
    return "blockwise"


def multihead_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, q_pos_BT: jax.Array,
                        k_pos_BS: jax.Array, window: int | None = None, q_seg_BT: jax.Array | None = None,
                        k_seg_BS: jax.Array | None = None, impl: str = "auto", block: int = 512,
                        self_attention: bool = False) -> jax.Array:
    """Attention output (B, T, N, H) under the position/segment mask, by the chosen implementation.

    All implementations agree for every query that sees at least one key. `self_attention` says the
    keys are the queries' own row (no cache) with positions counting up by one within each segment
    (padding, position -1, anywhere), which "splash" requires (its window is by index).
    """
    impl = resolve_impl(impl, self_attention, q_seg_BT is not None, dtype=q_BTNH.dtype, head_dim=q_BTNH.shape[-1])
    if impl == "splash" and not self_attention:
        raise ValueError(f"attention implementation {impl!r} serves self-attention rows only (no cache)")
    if impl == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention implementation 'cudnn' runs on NVIDIA GPUs only; this backend is "
                             f"{jax.default_backend()!r}")
        if q_BTNH.dtype not in CUDNN_DTYPES:
            raise ValueError(f"attention implementation 'cudnn' takes bfloat16 or float16, got {q_BTNH.dtype}")
    if impl == "dense":
        return attend(q_BTNH, k_BSKH, v_BSKH, attention_mask(q_pos_BT, k_pos_BS, window, q_seg_BT, k_seg_BS))
    if impl == "blockwise":
        return blockwise_attend(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, k_pos_BS, window, q_seg_BT, k_seg_BS,
                                block_q=block, block_k=block, self_attention=self_attention)
    if impl == "splash":
        return splash_attend(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, window, q_seg_BT, block=block)
    # is_causal and local_window_size mask by index: wrong for left-padded rows, positions that do not
    # count up with the index, and packed segments. The explicit mask costs (B, T, S) booleans beside
    # the (B, N, T, S) scores the XLA implementation materialises anyway; cuDNN reads it as a (B, 1, T, S)
    # bias and never materialises the scores.
    mask_B1TS = attention_mask(q_pos_BT, k_pos_BS, window, q_seg_BT, k_seg_BS)[:, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS, implementation=impl)


def splash_attend(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, pos_BT: jax.Array,
                  window: int | None, seg_BT: jax.Array | None = None, block: int = 512,
                  interpret: bool | None = None) -> jax.Array:
    """Self-attention (B, T, N, H) through Pallas splash attention with a causal or local mask.

    The mask is by index: a query sees the W keys ending at itself, within its segment, so positions
    must count up by one within each segment. Padding (position -1) may sit anywhere: it is moved to a
    segment of its own, which no real query sees. Runs as a TPU kernel on TPU and in interpret mode
    elsewhere.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    if N % K:
        raise ValueError(f"splash_attend: {N} query heads not divisible by {K} kv heads")
    G = N // K
    bq = min(block, -(-T // 128) * 128)
    Tp = -(-T // bq) * bq
    pad_seg = jnp.iinfo(jnp.int32).min  # padding's own segment (a real segment id is never this)
    seg = jnp.ones_like(pos_BT, jnp.int32) if seg_BT is None else seg_BT.astype(jnp.int32)
    seg = jnp.where(pos_BT >= 0, seg, pad_seg)
    pad = ((0, 0), (0, Tp - T))
    seg = jnp.pad(seg, pad, constant_values=pad_seg)
    q_BKGTH = jnp.pad(q_BTNH, pad + ((0, 0), (0, 0))).reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)
    k_BKTH = jnp.pad(k_BTKH, pad + ((0, 0), (0, 0))).transpose(0, 2, 1, 3)
    v_BKTH = jnp.pad(v_BTKH, pad + ((0, 0), (0, 0))).transpose(0, 2, 1, 3)
    if window is None:
        head = sm.CausalMask(shape=(Tp, Tp))
    else:
        head = sm.LocalMask(shape=(Tp, Tp), window_size=(window - 1, 0), offset=0)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bq, block_kv_compute=bq, block_q_dkv=bq, block_kv_dkv=bq,
                          block_kv_dkv_compute=bq, block_q_dq=bq, block_kv_dq=bq)
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([head] * G), block_sizes=sizes,
                                              interpret=interpret)

    def one(q_GTH, k_TH, v_TH, seg_T):
        return kernel(q_GTH * (H ** -0.5), k_TH, v_TH, segment_ids=sk.SegmentIds(q=seg_T, kv=seg_T))

    per_kv = jax.vmap(one, in_axes=(0, 0, 0, None))                  # over kv heads
    out_BKGTH = jax.vmap(per_kv, in_axes=(0, 0, 0, 0))(q_BKGTH, k_BKTH, v_BKTH, seg)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T].astype(q_BTNH.dtype)

"""Mistral decoder in functional Flax (linen): einsum-shaped weights with logical axis names.

Axis letters: B batch, T query length, S key length, D model dim, N query heads, K kv heads,
H head dim, F feed-forward hidden, V vocab.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mistral_jax.model import cache as kv_cache
from mistral_jax.model import embed
from mistral_jax.model import matvec
from mistral_jax.model import packing
from mistral_jax.model import sharding
from mistral_jax.model.attention import multihead_attention
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.lora_config import LORA_A_SUFFIX, LORA_B_SUFFIX, LoraConfig
from mistral_jax.model.projection import project
from mistral_jax.model.rope import apply_rope

Dtype = Any
_init = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init=_init, packed: bool = False) -> jax.Array:
    """The param `name`; a weight passed packed (packing.pack: bfloat16 as uint16 bits) comes back as
    bfloat16 unless `packed` asks for the bits (to gather rows before unpacking them)."""
    w = module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)
    return w if packed else packing.unpack(w)


def _constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, axes)


def lora_a_init(n_in: int, n_batch: int = 0) -> Any:
    """Initializer of a LoRA `A` of shape (batch..., in..., rank): uniform within +-1/sqrt(fan_in), fan_in
    the product of the n_in input dims (the usual LoRA init); `B` starts at zero."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                            in_axis=tuple(range(n_batch, n_batch + n_in)), out_axis=-1,
                                            batch_axis=tuple(range(n_batch)))


def _lora_delta(module: nn.Module, name: str, x: jax.Array, in_axes: tuple[str, ...],
                out_shape: tuple[int, ...], out_axes: tuple[str, ...]) -> jax.Array | None:
    """The low-rank update (alpha / rank) * (x A) B of projection `name`, or None when the module's LoRA
    config does not target it. x's trailing len(in_axes) dims are the projection's inputs.

    Params "<name>_lora_a" (in..., rank) and "<name>_lora_b" (rank, out...); the rank axis is unsharded
    (logical name None). The update stays unmerged (x A first), so W + A B is never formed.
    """
    lcfg = module.lora
    if lcfg is None or name not in lcfg.targets:
        return None
    n_in, r = len(in_axes), lcfg.rank
    a = _param(module, name + LORA_A_SUFFIX, (*x.shape[-n_in:], r), (*in_axes, None), lora_a_init(n_in))
    b = _param(module, name + LORA_B_SUFFIX, (r, *out_shape), (None, *out_axes), nn.initializers.zeros)
    xa = jnp.tensordot(x, a.astype(module.dtype), axes=n_in) * lcfg.scale   # (..., rank)
    return jnp.tensordot(xa, b.astype(module.dtype), axes=1)                # (..., out...)


def _plus(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    return y if delta is None else y + delta


def _dense(module: nn.Module, spec: str, x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x times the weight w (as `_param(..., packed=True)` returns it) by the einsum `spec`, whose first n_in
    weight axes are contracted, in the module's dtype (`projection.project`: its backward has XLA:CPU copy the
    saved input, not each cotangent). With module.fused_matvec and few rows (a decode step), a fused
    matrix-vector product (matvec.py) that reads w once instead of XLA's dot."""
    if module.fused_matvec and matvec.applies(math.prod(x.shape[:x.ndim - n_in]), w.dtype):
        return matvec.matvec(x, w, n_in).astype(module.dtype)
    return project(spec, x.astype(module.dtype), packing.unpack(w).astype(module.dtype))


class RMSNorm(nn.Module):
    """x / rms(x) computed in float32, cast back to the compute dtype, then scaled."""
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale_D = _param(self, "scale", (x_BTD.shape[-1],), ("norm",), nn.initializers.ones)
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x.astype(self.dtype) * scale_D.astype(self.dtype)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); with `lora`, targeted projections add their low-rank update."""
    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoraConfig | None = None
    fused_matvec: bool = False

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        D, F = self.cfg.dim, self.cfg.hidden_dim
        w1_DF = _param(self, "w1", (D, F), ("embed", "mlp"), packed=True)
        w3_DF = _param(self, "w3", (D, F), ("embed", "mlp"), packed=True)
        w2_FD = _param(self, "w2", (F, D), ("mlp", "embed"), packed=True)
        gate_BTF = _plus(_dense(self, "btd,df->btf", x_BTD, w1_DF),
                         _lora_delta(self, "w1", x_BTD, ("embed",), (F,), ("mlp",)))
        up_BTF = _plus(_dense(self, "btd,df->btf", x_BTD, w3_DF),
                       _lora_delta(self, "w3", x_BTD, ("embed",), (F,), ("mlp",)))
        h_BTF = _constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "act_mlp"))
        return _plus(_dense(self, "btf,fd->btd", h_BTF, w2_FD),
                     _lora_delta(self, "w2", h_BTF, ("mlp",), (D,), ("embed",)))


class Attention(nn.Module):
    """GQA self-attention; with a layer cache, attends to cached keys plus the chunk and returns the chunk's k/v.
    With `lora`, targeted projections add their low-rank update."""
    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attn_impl: str = "auto"
    attn_block: int = 512
    lora: LoraConfig | None = None
    fused_matvec: bool = False

    @nn.compact
    def __call__(self, x_BTD: jax.Array, pos_BT: jax.Array, seg_BT: jax.Array | None = None,
                 cache: kv_cache.LayerCache | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """(output (B, T, D), with a layer cache the chunk's {"k", "v"} (B, T, K, H) as the cache stores them)."""
        c = self.cfg
        D, N, K, H = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
        wq_DNH = _param(self, "wq", (D, N, H), ("embed", "q_heads", "head_dim"), packed=True)
        wk_DKH = _param(self, "wk", (D, K, H), ("embed", "kv_heads", "head_dim"), packed=True)
        wv_DKH = _param(self, "wv", (D, K, H), ("embed", "kv_heads", "head_dim"), packed=True)
        wo_NHD = _param(self, "wo", (N, H, D), ("q_heads", "head_dim", "embed"), packed=True)

        q_BTNH = _plus(_dense(self, "btd,dnh->btnh", x_BTD, wq_DNH),
                       _lora_delta(self, "wq", x_BTD, ("embed",), (N, H), ("q_heads", "head_dim")))
        k_BTKH = _plus(_dense(self, "btd,dkh->btkh", x_BTD, wk_DKH),
                       _lora_delta(self, "wk", x_BTD, ("embed",), (K, H), ("kv_heads", "head_dim")))
        v_BTKH = _plus(_dense(self, "btd,dkh->btkh", x_BTD, wv_DKH),
                       _lora_delta(self, "wv", x_BTD, ("embed",), (K, H), ("kv_heads", "head_dim")))
        q_BTNH = apply_rope(q_BTNH, pos_BT, c.rope_theta)
        k_BTKH = apply_rope(k_BTKH, pos_BT, c.rope_theta)
        q_BTNH = _constrain(q_BTNH, ("batch", "length", "act_heads", "head_dim"))
        k_BTKH = _constrain(k_BTKH, ("batch", "length", "act_kv_heads", "head_dim"))
        v_BTKH = _constrain(v_BTKH, ("batch", "length", "act_kv_heads", "head_dim"))

        if cache is None:
            k_BSKH, v_BSKH, kpos_BS, kseg_BS = k_BTKH, v_BTKH, pos_BT, seg_BT
            update = None
        else:
            if seg_BT is not None:
                raise ValueError("Attention: segment ids are for packed training rows, not cached decoding")
            # the chunk's queries see the cache as it was before the chunk (slots the chunk will overwrite
            # included: its early queries may still need them) followed by the chunk itself; the layer
            # returns the chunk's keys and values, written for all layers after the loop (cache.write_layers)
            k_BSKH = jnp.concatenate([kv_cache.read(cache["k"], self.dtype), k_BTKH], axis=1)
            v_BSKH = jnp.concatenate([kv_cache.read(cache["v"], self.dtype), v_BTKH], axis=1)
            kpos_BS = jnp.concatenate([cache["pos"], pos_BT.astype(jnp.int32)], axis=1)
            kseg_BS = None
            update = {"k": kv_cache.stored(k_BTKH, cache["k"].dtype), "v": kv_cache.stored(v_BTKH, cache["v"].dtype)}
        out_BTNH = multihead_attention(q_BTNH, k_BSKH, v_BSKH, pos_BT, kpos_BS, c.sliding_window, seg_BT, kseg_BS,
                                       impl=self.attn_impl, block=self.attn_block, self_attention=cache is None)
        return _plus(_dense(self, "btnh,nhd->btd", out_BTNH, wo_NHD, n_in=2),
                     _lora_delta(self, "wo", out_BTNH, ("q_heads", "head_dim"), (D,), ("embed",))), update


class Block(nn.Module):
    """Pre-norm decoder block: h += attn(norm(h)); h += ffn(norm(h))."""
    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attn_impl: str = "auto"
    attn_block: int = 512
    lora: LoraConfig | None = None
    fused_matvec: bool = False

    @nn.compact
    def __call__(self, h_BTD, pos_BT, seg_BT=None, cache=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        a_BTD, update = Attention(self.cfg, name="attention", attn_impl=self.attn_impl, attn_block=self.attn_block,
                                  lora=self.lora, fused_matvec=self.fused_matvec, **kw)(
            RMSNorm(self.cfg.norm_eps, name="attention_norm", **kw)(h_BTD), pos_BT, seg_BT, cache)
        h_BTD = h_BTD + a_BTD
        h_BTD = h_BTD + FeedForward(self.cfg, name="feed_forward", lora=self.lora,
                                    fused_matvec=self.fused_matvec, **kw)(
            RMSNorm(self.cfg.norm_eps, name="ffn_norm", **kw)(h_BTD))
        return _constrain(h_BTD, ("batch", "length", "act_embed")), update


REMAT_POLICIES = ("none", "full", "dots")


def remat_policy(name: str) -> Any:
    """The jax.checkpoint policy of a remat name: "full" saves nothing (None), "dots" saves the matmul
    outputs without batch dimensions (projections and FFN, not attention scores)."""
    if name not in REMAT_POLICIES or name == "none":
        raise ValueError(f"remat_policy: remat must be one of {REMAT_POLICIES[1:]} here, got {name!r}")
    return None if name == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def _layer_slice(cache: kv_cache.Cache, i: int) -> kv_cache.LayerCache:
    return {k: v[i] for k, v in cache.items()}


class Transformer(nn.Module):
    """Token ids -> float32 logits. Optional positions, segment ids (packing) and a stacked KV cache.

    With scan_layers (the default) the blocks are one `nn.scan` over a leading layer axis: params live
    under "layers" with shape (n_layers, ...) and logical axis "layers". scan_layers=False is the plain
    Python loop with params "layers_{i}" (same maths; kept as the reference for the scanned model).
    remat: "none", "full" (recompute each block in the backward pass) or "dots" (keep matmul outputs).
    lora (a lora.LoraConfig): each targeted projection also holds "<w>_lora_a"/"<w>_lora_b" adapter params
    and computes x W + (alpha / rank) (x A) B; None (the default) is the plain model.
    fused_matvec: projections of few rows (a decode step) use matvec.matvec, which reads each weight once; for
    inference programs on the CPU backend compiled with matvec.CPU_COMPILER_OPTIONS, never under a gradient.
    """
    cfg: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    scan_layers: bool = True
    attn_impl: str = "auto"    # attention.IMPLS; "auto": splash on TPU, cudnn (bf16) or xla on GPU, else blockwise
    attn_block: int = 512      # query/key block size of the blockwise path
    lora: LoraConfig | None = None
    fused_matvec: bool = False

    def _block_cls(self) -> Any:
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Transformer: remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.remat == "none":
            return Block
        # Under scan, the loop itself keeps XLA from merging recomputation into the forward pass.
        return nn.remat(Block, prevent_cse=not self.scan_layers, policy=remat_policy(self.remat))

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
                 segment_ids_BT: jax.Array | None = None,
                 cache: kv_cache.Cache | None = None,
                 logit_index_B: jax.Array | None = None,
                 return_hidden: bool = False,
                 head_VD: jax.Array | None = None,
                 ) -> tuple[jax.Array, kv_cache.Cache | None]:
        """Returns (logits_BTV, updated cache). With logit_index_B, only the logits at that index of
        each row are computed: (B, 1, V). With return_hidden, returns the final normed hidden states
        (B, T, D) instead of logits (for a chunked loss against params['output']). head_VD: params['output']
        transposed, used in its place (decoding passes it: see `inference.head.transposed_head`)."""
        c = self.cfg
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
        if cache is not None and cache["k"].shape[0] != c.n_layers:
            raise ValueError(f"Transformer: cache has {cache['k'].shape[0]} layers, model has {c.n_layers}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(attn_impl=self.attn_impl, attn_block=self.attn_block, lora=self.lora,
                        fused_matvec=self.fused_matvec, **kw)
        emb_VD = _param(self, "tok_embeddings", (c.vocab_size, c.dim), ("vocab", "embed"), packed=True)
        h_BTD = embed.lookup(emb_VD, tokens_BT, self.dtype)
        h_BTD = _constrain(h_BTD, ("batch", "length", "act_embed"))
        block_cls = self._block_cls()
        if self.scan_layers:
            # carry h; positions and segment ids are the same for every layer; the cache is sliced per layer
            blocks = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, nn.broadcast, 0), length=c.n_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            h_BTD, updates = blocks(c, name="layers", **block_kw)(h_BTD, positions_BT, segment_ids_BT, cache)
        else:
            layer_updates = []
            for i in range(c.n_layers):
                h_BTD, update = block_cls(c, name=f"layers_{i}", **block_kw)(
                    h_BTD, positions_BT, segment_ids_BT, None if cache is None else _layer_slice(cache, i))
                layer_updates.append(update)
            updates = None if cache is None else {k: jnp.stack([u[k] for u in layer_updates]) for k in ("k", "v")}
        new_cache = None if cache is None else kv_cache.write_layers(cache, updates["k"], updates["v"], positions_BT)
        if logit_index_B is not None:
            h_BTD = jnp.take_along_axis(h_BTD, logit_index_B[:, None, None].astype(jnp.int32), axis=1)
        h_BTD = RMSNorm(c.norm_eps, name="norm", **kw)(h_BTD)
        if return_hidden:
            return h_BTD, new_cache
        out_DV = _param(self, "output", (c.dim, c.vocab_size), ("embed", "vocab"), packed=True)
        # the head is not stacked, so only a packed one gains from matvec (XLA's dot would widen it whole)
        if head_VD is not None:
            if head_VD.shape != (c.vocab_size, c.dim):
                raise ValueError(f"Transformer: head_VD has shape {head_VD.shape}, expected (vocab, dim) = "
                                 f"{(c.vocab_size, c.dim)}")
            logits_BTV = jnp.einsum("btd,vd->btv", h_BTD, head_VD.astype(self.dtype),
                                    preferred_element_type=jnp.float32)
        elif (self.fused_matvec and out_DV.dtype == packing.PACKED
                and matvec.applies(h_BTD.shape[0] * h_BTD.shape[1], out_DV.dtype)):
            out_DV, h_BTD = jax.lax.optimization_barrier((out_DV, h_BTD))  # no widening hoisted out of a loop
            logits_BTV = matvec.matvec(h_BTD, out_DV)
        else:
            out_DV, h_BTD = packing.unpack_after(out_DV, h_BTD)
            logits_BTV = jnp.einsum("btd,dv->btv", h_BTD, out_DV.astype(self.dtype),
                                    preferred_element_type=jnp.float32)
        return _constrain(logits_BTV, ("batch", "length", "act_vocab")), new_cache


# ----- scanned <-> per-layer param trees -----

def unstack_layers(params: Mapping[str, Any], n_layers: int) -> dict[str, Any]:
    """Scanned tree ("layers" with a leading layer axis) -> per-layer tree ("layers_0", ...)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"])
    return out


# ----- params: abstract shapes, shardings, sharded init -----

def _dummy_tokens() -> jax.Array:
    return jnp.zeros((1, 1), jnp.int32)


def abstract_params(cfg: ModelConfig, param_dtype: Dtype = jnp.float32, scan_layers: bool = True,
                    lora: LoraConfig | None = None) -> Any:
    """Boxed (LogicallyPartitioned) ShapeDtypeStructs of the params (with `lora`, adapters included),
    without allocating anything."""
    model = Transformer(cfg, param_dtype=param_dtype, scan_layers=scan_layers, lora=lora)
    return jax.eval_shape(lambda r: model.init(r, _dummy_tokens()), jax.random.key(0))["params"]


def count_params(cfg: ModelConfig) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(abstract_params(cfg))))


def param_shardings(cfg: ModelConfig, mesh: Mesh, param_dtype: Dtype = jnp.float32,
                    scan_layers: bool = True, lora: LoraConfig | None = None) -> Any:
    """Tree of NamedShardings for the (unboxed) params on `mesh` (with `lora`, adapters included)."""
    abstract = abstract_params(cfg, param_dtype, scan_layers, lora)
    return sharding.logical_shardings(nn.get_partition_spec(abstract), mesh, nn.unbox(abstract))


def init_params(cfg: ModelConfig, rng: jax.Array, mesh: Mesh | None = None,
                param_dtype: Dtype = jnp.float32, lora: LoraConfig | None = None) -> Any:
    """Random params (unboxed), created directly in their shardings when a mesh is given. With `lora`,
    adapters too (B = 0); with scanned layers the base weights then differ from those drawn without it for
    the same rng (flax's scan shares rng counters between traces): to adapt given weights use
    `lora.add_adapters`."""
    model = Transformer(cfg, param_dtype=param_dtype, lora=lora)

    def init(r):
        return nn.unbox(model.init(r, _dummy_tokens())["params"])

    if mesh is None:
        return jax.jit(init)(rng)
    return jax.jit(init, out_shardings=param_shardings(cfg, mesh, param_dtype, lora=lora))(rng)


def forward(params: Any, tokens_BT: jax.Array, cfg: ModelConfig, dtype: Dtype = jnp.float32,
            positions_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None,
            lora: LoraConfig | None = None) -> jax.Array:
    """Jitted full-sequence forward pass returning float32 logits (B, T, V) (with `lora`, params hold
    the adapters too). bfloat16 params are passed packed (packing.py), so no float32 copy is made."""
    return _forward(packing.pack(params), tokens_BT, cfg, dtype, positions_BT, segment_ids_BT, lora)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "lora"))
def _forward(params: Any, tokens_BT: jax.Array, cfg: ModelConfig, dtype: Dtype, positions_BT: jax.Array | None,
             segment_ids_BT: jax.Array | None, lora: LoraConfig | None) -> jax.Array:
    with sharding.with_rules():
        logits, _ = Transformer(cfg, dtype=dtype, lora=lora).apply({"params": params}, tokens_BT, positions_BT,
                                                                   segment_ids_BT)
    return logits

"""LoRA: low-rank adapters on the model's projections, for fine-tuning with the base weights frozen.

A targeted projection W (in..., out...) gets A (in..., rank) and B (rank, out...), stored beside it as
"<w>_lora_a" / "<w>_lora_b" in the same module (so scanned layers stack them like every other param), and
computes y = x W + (alpha / rank) (x A) B (see `model.Transformer(lora=...)`). B starts at zero, so fresh
adapters leave the model's outputs unchanged. This module holds the pure params-tree operations: adding
fresh adapters to base params, splitting adapters (trained) from base (frozen) and joining them back, and
merging the adapters into the weights for export (the config is in `lora_config`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax.model import packing
from mistral_jax.model import transformer as model_lib
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.lora_config import LORA_A_SUFFIX as A_SUFFIX
from mistral_jax.model.lora_config import LORA_B_SUFFIX as B_SUFFIX
from mistral_jax.model.lora_config import TARGETS, LoraConfig, check_rank
from mistral_jax.model.param_tree import host_array, key_name

# (number of input dims, number of output dims) of each projection's per-layer weight
_PROJ_DIMS = {"wq": (1, 2), "wk": (1, 2), "wv": (1, 2), "wo": (2, 1), "w1": (1, 1), "w2": (1, 1), "w3": (1, 1)}
_ADAPTER_NAMES = frozenset(t + s for t in TARGETS for s in (A_SUFFIX, B_SUFFIX))


# ----- adapters vs base: pure params-tree manipulation -----

def is_adapter_path(path: tuple[str, ...]) -> bool:
    """True when `path` (params-tree keys, e.g. ("layers", "attention", "wq_lora_a")) names an adapter."""
    return bool(path) and key_name(path[-1]) in _ADAPTER_NAMES


def _split(tree: Mapping[str, Any], path: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    adapters: dict[str, Any] = {}
    base: dict[str, Any] = {}
    for k, v in tree.items():
        p = (*path, k)
        if isinstance(v, Mapping):
            a, b = _split(v, p)
            if a:
                adapters[k] = a
            if b or not a:   # keeps empty sub-dicts of the input in base, drops adapter-only modules
                base[k] = b
        elif is_adapter_path(p):
            adapters[k] = v
        else:
            base[k] = v
    return adapters, base


def split(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapters, base): the adapter leaves and everything else, as two nested dicts of the same leaves.

    Works on any params-shaped tree (arrays, ShapeDtypeStructs, shardings, logical specs).
    """
    return _split(params, ())


def join(adapters: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `split`: one nested dict holding both trees' leaves (a key in both must be a dict)."""
    return _join(adapters, base, ())


def _join(adapters: Mapping[str, Any], base: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = dict(base)
    for k, v in adapters.items():
        if k not in out:
            out[k] = dict(v) if isinstance(v, Mapping) else v
        elif isinstance(v, Mapping) and isinstance(out[k], Mapping):
            out[k] = _join(v, out[k], (*path, k))
        else:
            raise ValueError(f"lora.join: '{'/'.join((*path, k))}' is in both the adapters and the base tree")
    return out


def _modules(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Mapping]]:
    """(path, dict) of every dict in the tree, depth first."""
    yield path, tree
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _modules(v, (*path, k))


def _n_batch(name: str, where: str, w_shape: tuple[int, ...]) -> int:
    """Leading (stacked layer) axes of a projection weight: 1 in the scanned tree, 0 per layer."""
    n_in, n_out = _PROJ_DIMS[name]
    nb = len(w_shape) - n_in - n_out
    if nb not in (0, 1):
        raise ValueError(f"lora: param '{where}' has shape {tuple(w_shape)}; a {name} weight has {n_in + n_out} "
                         "dims, plus a leading layer axis when stacked")
    return nb


# ----- fresh adapters -----

def add_adapters(params: Mapping[str, Any], cfg: ModelConfig, lcfg: LoraConfig, rng: jax.Array) -> dict[str, Any]:
    """Base params + fresh adapters for lcfg.targets (A random, B zero, in each weight's dtype): the tree
    `model.Transformer(cfg, lora=lcfg)` uses, scanned or per-layer like `params`. Base leaves are the
    same objects as in `params` (not copied)."""
    existing, _ = split(params)
    if existing:
        first = "/".join(next(p for p, _ in _leaf_paths(existing)))
        raise ValueError(f"lora.add_adapters: params already hold LoRA adapters (e.g. '{first}')")
    _check_against_model(params, cfg, None, "lora.add_adapters")
    check_rank(cfg, lcfg, "lora.add_adapters")
    adapters: dict[str, Any] = {}
    n = 0
    for path, module in _modules(params):
        for name in lcfg.targets:
            if name not in module or isinstance(module[name], Mapping):
                continue
            w = module[name]
            where = "/".join((*path, name))
            nb = _n_batch(name, where, tuple(w.shape))
            n_in = _PROJ_DIMS[name][0]
            a_shape = (*w.shape[:nb + n_in], lcfg.rank)
            b_shape = (*w.shape[:nb], lcfg.rank, *w.shape[nb + n_in:])
            key = jax.random.fold_in(rng, n)
            n += 1
            node = adapters
            for k in path:
                node = node.setdefault(k, {})
            node[name + A_SUFFIX] = model_lib.lora_a_init(n_in, nb)(key, a_shape, w.dtype)
            node[name + B_SUFFIX] = jnp.zeros(b_shape, w.dtype)
    out = join(adapters, params)
    _check_against_model(out, cfg, lcfg, "lora.add_adapters")   # the adapters are the model's
    return out


def _leaf_paths(tree: Mapping[str, Any]) -> Iterator[tuple[tuple[str, ...], Any]]:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        yield tuple(key_name(k) for k in path), leaf


def _check_against_model(params: Mapping[str, Any], cfg: ModelConfig, lcfg: LoraConfig | None, who: str) -> None:
    """Raises a ValueError naming the first param missing, unexpected or mis-shaped for cfg (and lcfg)."""
    scanned = "layers" in params
    want = {p: tuple(x.shape) for p, x in
            _leaf_paths(nn.unbox(model_lib.abstract_params(cfg, scan_layers=scanned, lora=lcfg)))}
    got = {p: tuple(np.shape(x)) for p, x in _leaf_paths(params)}
    for p in sorted(set(want) | set(got)):
        if p not in got:
            raise ValueError(f"{who}: param '{'/'.join(p)}' of the model config is missing from the params")
        if p not in want:
            raise ValueError(f"{who}: param '{'/'.join(p)}' is not in the model (config and LoRA targets "
                             f"{lcfg.targets if lcfg else ()})")
        if got[p] != want[p]:
            raise ValueError(f"{who}: param '{'/'.join(p)}' has shape {got[p]}, the model config wants {want[p]}")


# ----- merging for export -----

@functools.partial(jax.jit, static_argnames=("nb",))
def _merged(w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array, nb: int) -> jax.Array:
    """W + scale * A B in float32, cast to W's dtype; nb leading (layer) axes are batch axes."""
    batch = tuple(range(nb))
    ab = jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32),
                             (((a.ndim - 1,), (nb,)), (batch, batch)), precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + scale * ab).astype(w.dtype)


def _adapted(params: Mapping[str, Any], lcfg: LoraConfig
             ) -> Iterator[tuple[tuple[str, ...], Any, Any, Any, int]]:
    """(path of W, W, A, B, number of leading layer axes) of every adapted weight of `params` (base weights
    and adapters in one tree); ValueError naming the weight when the tree does not match lcfg."""
    for path, module in list(_modules(params)):
        for name in TARGETS:
            where = "/".join((*path, name))
            found = [k for k in (name, name + A_SUFFIX, name + B_SUFFIX) if k in module]
            if found in ([], [name]):   # not a LoRA-adapted weight here
                if name in lcfg.targets and found:
                    raise ValueError(f"lora.merge: '{where}' is a LoRA target of the config but has no adapters")
                continue
            if name not in lcfg.targets:
                raise ValueError(f"lora.merge: '{where}' has adapters but is not in the config's targets "
                                 f"{lcfg.targets}")
            if len(found) != 3:
                raise ValueError(f"lora.merge: '{where}' needs {name}, {name}{A_SUFFIX} and {name}{B_SUFFIX}; "
                                 f"found {found}")
            w, a, b = module[name], module[name + A_SUFFIX], module[name + B_SUFFIX]
            if a.shape[-1] != lcfg.rank:
                raise ValueError(f"lora.merge: '{where}{A_SUFFIX}' has rank {a.shape[-1]}, the config's rank is "
                                 f"{lcfg.rank}")
            yield (*path, name), w, a, b, _n_batch(name, where, tuple(w.shape))


def merge(params: Mapping[str, Any], lcfg: LoraConfig) -> dict[str, Any]:
    """The plain model's params: every targeted W replaced by W + (alpha / rank) A B (computed in float32,
    cast to W's dtype, in W's sharding), adapter leaves dropped; for any checkpoint writer or export.

    Each merged W is a new array beside the old one (two copies of the adapted weights at once); a run's
    final export uses `merge_in_place` instead."""
    out = split(params)[1]
    scale = jnp.float32(lcfg.scale)
    for path, w, a, b, nb in _adapted(params, lcfg):
        merged = _merged(w, a, b, scale, nb=nb)
        if isinstance(w, jax.Array) and merged.sharding != w.sharding:
            merged = jax.device_put(merged, w.sharding)
        out = _replace(out, path, merged)
    return out


def merge_in_place(params: Mapping[str, Any], lcfg: LoraConfig) -> dict[str, Any]:
    """Like `merge`, but consumes the base weights: each adapted W is overwritten with W + (alpha / rank) A B
    (float32 sum, cast to W's dtype) where it lies, one layer at a time, so the model is never held twice.

    On the CPU backend each of W's device buffers is rewritten on the host through a writable view of its
    memory (the arrays, and any `packing.pack`ed views of them, then hold the merged weights; a packed W is
    merged as the bfloat16 it stands for); elsewhere W is donated to a jitted per-layer update (the old
    array is deleted). Nothing may still be computing from W. Extra memory: about two float32 copies of one
    layer's W, plus A and B in float32. Returns the plain model's params (adapter leaves dropped)."""
    out = split(params)[1]
    scale = np.float32(lcfg.scale)
    for path, w, a, b, nb in _adapted(params, lcfg):
        views = _host_views(w)
        if views is not None:
            _merge_on_host(views, _host_f32(a), _host_f32(b), scale, nb)
            merged = w
        else:
            merged = _merge_donated(w, a, b, jnp.float32(scale), nb=nb, out_sharding=w.sharding)
        out = _replace(out, path, merged)
    return out


_BF16 = np.dtype(jnp.bfloat16)
# (read-only numpy view that keeps the buffer alive, writable view of the same memory, the shard's index)
_View = tuple[np.ndarray, np.ndarray, tuple]


def _host_views(w: Any) -> list[_View] | None:
    """Writable numpy views of each distinct device buffer of w when all are host memory (the CPU backend)
    and viewable without a copy; else None. A packed (uint16) array is viewed as the bfloat16 it holds."""
    if not isinstance(w, jax.Array) or not packing.on_cpu(w.sharding.device_set):
        return None
    jax.block_until_ready(w)
    views, seen = [], set()
    for shard in w.addressable_shards:
        ptr = shard.data.unsafe_buffer_pointer()
        if ptr in seen:     # one buffer placed on several devices: rewritten once
            continue
        seen.add(ptr)
        ro = np.asarray(shard.data)
        if ro.__array_interface__["data"][0] != ptr or not ro.flags.c_contiguous:
            return None     # the host view is a copy, or not C-ordered
        holder = type("_Buffer", (), {"__array_interface__": {**ro.__array_interface__, "data": (ptr, False)}})()
        rw = np.asarray(holder).view(ro.dtype)
        views.append((ro, rw.view(_BF16) if ro.dtype == np.uint16 else rw, tuple(shard.index)))
    return views


def _host_f32(x: Any) -> np.ndarray:
    """An adapter factor as a float32 host array (gathered from every process when sharded over several)."""
    return np.asarray(host_array(x), np.float32)


def _merge_on_host(views: list[_View], a_f32: np.ndarray, b_f32: np.ndarray, scale: np.float32, nb: int) -> None:
    """Adds scale * A B (float32) to W through the writable views of its buffers, one layer at a time when
    W is stacked (nb = 1), rounding once to W's dtype."""
    for _keep, x, index in views:
        layers = range(a_f32.shape[0])[index[0]] if nb else [None]
        for j, layer in enumerate(layers):
            a_l, b_l = (a_f32, b_f32) if layer is None else (a_f32[layer], b_f32[layer])
            rows = x[j] if nb else x
            ab = a_l.reshape(-1, a_l.shape[-1]) @ b_l.reshape(b_l.shape[0], -1)
            ab = ab.reshape(*a_l.shape[:-1], *b_l.shape[1:])[index[nb:]]
            ab *= scale
            ab += rows.astype(np.float32)
            np.copyto(rows, ab, casting="unsafe")


@functools.partial(jax.jit, static_argnames=("nb", "out_sharding"), donate_argnums=(0,))
def _merge_donated(w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array, nb: int,
                   out_sharding: Any) -> jax.Array:
    """W + scale * A B with W donated, a layer at a time (a loop of in-place dynamic-update-slices over the
    leading layer axis when nb = 1): for backends where W is not host memory."""
    if nb == 0:
        return jax.lax.with_sharding_constraint(_merged(w, a, b, scale, nb=0), out_sharding)

    def body(i: jax.Array, w: jax.Array) -> jax.Array:
        layer = _merged(jax.lax.dynamic_index_in_dim(w, i, keepdims=False), a[i], b[i], scale, nb=0)
        return jax.lax.dynamic_update_index_in_dim(w, layer, i, 0)

    return jax.lax.with_sharding_constraint(jax.lax.fori_loop(0, w.shape[0], body, w), out_sharding)


def _replace(tree: Mapping[str, Any], path: tuple[str, ...], leaf: Any) -> dict[str, Any]:
    """A copy of `tree` with the leaf at `path` replaced (the dicts on the way are copied, not modified)."""
    out = dict(tree)
    out[path[0]] = leaf if len(path) == 1 else _replace(tree[path[0]], path[1:], leaf)
    return out


# ----- reporting -----

def count_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of a tree (arrays or ShapeDtypeStructs), e.g. an optimizer state."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        else:
            total += np.asarray(leaf).nbytes
    return total

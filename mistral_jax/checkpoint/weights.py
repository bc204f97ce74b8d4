"""Name and layout mapping between this library's params and PyTorch state dicts.

Two foreign layouts: Hugging Face (`model.layers.N.self_attn.q_proj.weight`, rotate-half q/k rows,
the same rotary layout as ours) and mistral-inference (`layers.N.attention.wq.weight`, interleaved
q/k rows). Both store Linear weights as (out, in). Functions here work on numpy arrays, one tensor
at a time, so callers can stream.

Our params stack the layers (scanned model): the foreign tensor `layers.N.attention.wq.weight` is slice
N of our ("layers", "attention", "wq") array of shape (n_layers, D, N, H). A TensorSpec names that
path and its layer index; `to_ours`/`from_ours` convert one layer's slice.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

from mistral_jax.model.config import ModelConfig
from mistral_jax.errors import WeightError

LAYOUTS = ("hf", "mistral")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One foreign tensor: its key, its (out, in) shape, our param path (+ layer index into its leading
    axis, for per-layer tensors) and the two conversions of that one slice (`to_ours` may return a
    strided view of its input; `from_ours` returns a C-contiguous array, possibly read-only)."""
    key: str
    shape: tuple[int, ...]
    path: tuple[str, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    from_ours: Callable[[np.ndarray], np.ndarray]
    layer: int | None = None


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorders q/k rows within each head from (2i, 2i+1) pairs to (i, i + H/2) halves."""
    rows, cols = w.shape
    h = rows // n_heads
    return w.reshape(n_heads, h // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `interleaved_to_half`."""
    rows, cols = w.shape
    h = rows // n_heads
    return w.reshape(n_heads, 2, h // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _names(layout: str, i: int | None = None) -> dict[str, str]:
    if layout == "hf":
        if i is None:
            return {"emb": "model.embed_tokens.weight", "norm": "model.norm.weight", "out": "lm_head.weight"}
        p = f"model.layers.{i}."
        return {"attention_norm": p + "input_layernorm.weight", "ffn_norm": p + "post_attention_layernorm.weight",
                "wq": p + "self_attn.q_proj.weight", "wk": p + "self_attn.k_proj.weight",
                "wv": p + "self_attn.v_proj.weight", "wo": p + "self_attn.o_proj.weight",
                "w1": p + "mlp.gate_proj.weight", "w2": p + "mlp.down_proj.weight", "w3": p + "mlp.up_proj.weight"}
    if layout == "mistral":
        if i is None:
            return {"emb": "tok_embeddings.weight", "norm": "norm.weight", "out": "output.weight"}
        p = f"layers.{i}."
        return {"attention_norm": p + "attention_norm.weight", "ffn_norm": p + "ffn_norm.weight",
                **{w: p + f"attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")},
                **{w: p + f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}}
    raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")


def tensor_specs(cfg: ModelConfig, layout: str) -> list[TensorSpec]:
    """Every tensor of a checkpoint in `layout` ('hf' or 'mistral'), in a stable order."""
    D, N, K, H, F, V = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim, cfg.vocab_size
    ident = lambda w: w  # noqa: E731
    permute = layout == "mistral"

    def proj_in(heads: int, rope: bool):  # torch (heads*H, D) -> ours (D, heads, H)
        def to(w):
            if rope and permute:
                w = interleaved_to_half(w, heads)
            return w.T.reshape(D, heads, H)

        def back(w):
            w = contiguous(w.reshape(D, heads * H).T)
            return half_to_interleaved(w, heads) if rope and permute else w
        return to, back

    def back_t(w):  # ours (in, out) -> torch (out, in)
        return contiguous(w.T)

    g = _names(layout)
    specs = [TensorSpec(g["emb"], (V, D), ("tok_embeddings",), ident, ident)]
    for i in range(cfg.n_layers):
        n = _names(layout, i)
        q, k, v = proj_in(N, True), proj_in(K, True), proj_in(K, False)
        layer = [
            (n["attention_norm"], (D,), ("attention_norm", "scale"), ident, ident),
            (n["wq"], (N * H, D), ("attention", "wq"), *q),
            (n["wk"], (K * H, D), ("attention", "wk"), *k),
            (n["wv"], (K * H, D), ("attention", "wv"), *v),
            (n["wo"], (D, N * H), ("attention", "wo"), lambda w: w.T.reshape(N, H, D),
             lambda w: back_t(w.reshape(N * H, D))),
            (n["ffn_norm"], (D,), ("ffn_norm", "scale"), ident, ident),
            (n["w1"], (F, D), ("feed_forward", "w1"), lambda w: w.T, back_t),
            (n["w2"], (D, F), ("feed_forward", "w2"), lambda w: w.T, back_t),
            (n["w3"], (F, D), ("feed_forward", "w3"), lambda w: w.T, back_t),
        ]
        specs += [TensorSpec(key, shape, ("layers", *path), to, back, layer=i)
                  for key, shape, path, to, back in layer]
    specs += [TensorSpec(g["norm"], (D,), ("norm", "scale"), ident, ident),
              TensorSpec(g["out"], (V, D), ("output",), lambda w: w.T, back_t)]
    return specs


IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def check_keys(keys: set[str], specs: list[TensorSpec], source: str = "checkpoint") -> None:
    """Raises WeightError naming missing or unexpected tensors."""
    expected = {s.key for s in specs}
    missing = sorted(expected - keys)
    unexpected = sorted(k for k in keys - expected if not k.endswith(IGNORED_SUFFIXES))
    if missing:
        raise WeightError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                          f"({len(missing)} in all)")
    if unexpected:
        raise WeightError(f"{source}: unexpected tensor(s) {unexpected[:5]}"
                          f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all); "
                          "does the config match the checkpoint?")


def check_shape(source: str, name: str, got: tuple[int, ...], want: tuple[int, ...],
                what: str = "tensor") -> None:
    """Raises WeightError naming `name` in `source` when shape `got` differs from the config's `want`.

    The one shape check for foreign tensors, native params and exports alike.
    """
    if tuple(got) != tuple(want):
        raise WeightError(f"{source}: {what} '{name}' has shape {tuple(got)}, the config expects {tuple(want)}")


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple) -> Any:
    """The subtree of nested dicts at `path`: dict keys, or the entries of a jax tree key path."""
    for p in path:
        tree = tree[getattr(p, "key", p)]
    return tree


def group_specs(specs: list[TensorSpec]) -> list[list[TensorSpec]]:
    """Specs grouped by our param path (first-appearance order); a per-layer group is sorted by layer,
    so group[i] fills slice i of the stacked array."""
    groups: dict[tuple[str, ...], list[TensorSpec]] = {}
    for s in specs:
        groups.setdefault(s.path, []).append(s)
    return [sorted(g, key=lambda s: -1 if s.layer is None else s.layer) for g in groups.values()]


ALIGN = 64  # bytes; jax.device_put of a C-contiguous numpy array this aligned onto the CPU device aliases it


def aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = ALIGN) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an `align`-byte boundary.

    numpy's own buffers are only 16-byte aligned; placing a 64-byte-aligned one on the CPU device shares
    its memory instead of copying it.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _cpu_device() -> Any:
    """The CPU device, or None when JAX runs without its CPU backend (e.g. JAX_PLATFORMS=cuda)."""
    import jax
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def contiguous(x: np.ndarray) -> np.ndarray:
    """x as a C-contiguous array with the same bytes per element: x itself when it already is one, else a
    read-only copy.

    Strided views (the transposes of `to_ours`/`from_ours`) are copied by the CPU device's host transfer,
    which transposes in cache-sized tiles: about 5x faster than numpy's element-by-element strided copy
    of a 14336 x 4096 bfloat16 matrix, and bit-exact (bytes are moved, not converted).
    """
    if x.flags.c_contiguous:
        return x
    cpu = _cpu_device() if x.dtype.itemsize <= 4 else None  # jax narrows 64-bit types unless x64 is on
    if cpu is None:
        return np.ascontiguousarray(x)
    import jax
    return np.asarray(jax.device_put(x, cpu))


COPY_BLOCK_BYTES = 1 << 24  # a strided copy goes through `contiguous` in row blocks of about this size


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src for same-shape, same-dtype arrays; a strided src goes through `contiguous` one block of
    leading-axis rows at a time, so the temporary stays near COPY_BLOCK_BYTES."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"copy_into: source {src.dtype}{src.shape} does not match destination "
                         f"{dst.dtype}{dst.shape}")
    if src.flags.c_contiguous or src.ndim == 0:
        np.copyto(dst, src, casting="no")
        return
    rows = max(1, COPY_BLOCK_BYTES // max(1, src[0].nbytes))
    for i in range(0, src.shape[0], rows):
        np.copyto(dst[i:i + rows], contiguous(src[i:i + rows]), casting="no")


def assemble(group: list[TensorSpec], read: Callable[[TensorSpec], np.ndarray]) -> np.ndarray:
    """One param from its group of specs, in one `aligned_empty` buffer: the single tensor, or the
    per-layer slices on a leading axis, each copied into its slice as it is read (no per-layer list, no
    np.stack). `read(spec)` returns the slice in our layout (a strided view is fine)."""
    buf: np.ndarray | None = None
    for spec in group:
        x = read(spec)
        if buf is None:
            buf = aligned_empty(x.shape if spec.layer is None else (len(group), *x.shape), x.dtype)
        copy_into(buf if spec.layer is None else buf[spec.layer], x)
        del x
    assert buf is not None
    return buf


def param_slice(params: Mapping, spec: TensorSpec) -> Any:
    """Our array for one foreign tensor: the param at spec.path, indexed by spec.layer when per-layer."""
    w = get_path(params, spec.path)
    return w if spec.layer is None else w[spec.layer]


def state_dict_to_params(state: Mapping[str, Any], cfg: ModelConfig, layout: str,
                         dtype: Any = np.float32, source: str = "checkpoint") -> dict:
    """Converts a whole state dict (numpy-convertible tensors) into our nested params of numpy arrays."""
    specs = tensor_specs(cfg, layout)
    check_keys(set(state), specs, source)
    for spec in specs:
        check_shape(source, spec.key, np.shape(state[spec.key]), spec.shape)
    params: dict = {}
    for group in group_specs(specs):
        set_path(params, group[0].path,
                 assemble(group, lambda s: s.to_ours(np.asarray(state[s.key]).astype(dtype, copy=False))))
    return params

"""LoRA adapters as PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`), both ways.

PEFT stores, per adapted HF Linear of (out, in) weight W, `lora_A.weight` (r, in) and `lora_B.weight`
(out, r), and computes W + (lora_alpha / r) B A. Ours: A (in..., r), B (r, out...) beside W (in..., out...)
with the same alpha / r, so A_peft = A^T and B_peft = B^T with the head axes flattened. No row reorder is
needed for q_proj/k_proj: HF's rotate-half row order is also ours (weights.py reorders those rows only for
the mistral-inference layout), so B's rows follow W's exactly as the base export writes them.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from mistral_jax.checkpoint.integrity import check_values
from mistral_jax.checkpoint.peft_config import (CONFIG_FILE, HF_MODULES, HF_NAMES, check_run_lora,
                                                read_adapter_config, write_adapter_config)
from mistral_jax.errors import CheckpointError, WeightError
from mistral_jax.model import lora as lora_lib
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.lora_config import LORA_A_SUFFIX, LORA_B_SUFFIX, LoraConfig
from mistral_jax.model.param_tree import host_array
from mistral_jax.runtime.dtypes import parse_dtype
from mistral_jax.runtime.files import replace_dir

WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"    # PEFT's save_pretrained(safe_serialization=False)
_ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, LEGACY_WEIGHTS_FILE, "README.md")
_MODULE = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
           "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}

__all__ = ["save_peft_adapter", "load_peft_adapter", "merge_peft_adapter", "read_adapter_config", "check_run_lora",
           "peft_key", "adapter_shapes", "describe", "WEIGHTS_FILE", "CONFIG_FILE"]


def peft_key(layer: int, target: str, factor: str) -> str:
    """PEFT's saved key of one factor ('A' or 'B') of our projection `target` (e.g. 'wq') in `layer`."""
    return f"base_model.model.model.layers.{layer}.{HF_MODULES[target]}.lora_{factor}.weight"


def _io_shapes(cfg: ModelConfig, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input dims, output dims) of one layer's projection `target` in our layout."""
    D, N, K, H, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    return {"wq": ((D,), (N, H)), "wk": ((D,), (K, H)), "wv": ((D,), (K, H)), "wo": ((N, H), (D,)),
            "w1": ((D,), (F,)), "w2": ((F,), (D,)), "w3": ((D,), (F,))}[target]


def adapter_shapes(cfg: ModelConfig, lcfg: LoraConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Params-tree path -> shape of every adapter of the scanned model: A (n_layers, in..., r) and
    B (n_layers, r, out...)."""
    out = {}
    for t in lcfg.targets:
        d_in, d_out = _io_shapes(cfg, t)
        out[("layers", _MODULE[t], t + LORA_A_SUFFIX)] = (cfg.n_layers, *d_in, lcfg.rank)
        out[("layers", _MODULE[t], t + LORA_B_SUFFIX)] = (cfg.n_layers, lcfg.rank, *d_out)
    return out


def _peft_shapes(cfg: ModelConfig, lcfg: LoraConfig) -> dict[str, tuple[int, int]]:
    """PEFT key -> shape (A: (r, in), B: (out, r)) of every tensor of the adapter file, in a stable order."""
    out = {}
    for i in range(cfg.n_layers):
        for t in lcfg.targets:
            d_in, d_out = _io_shapes(cfg, t)
            out[peft_key(i, t, "A")] = (lcfg.rank, math.prod(d_in))
            out[peft_key(i, t, "B")] = (math.prod(d_out), lcfg.rank)
    return out


def _leaves(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return {tuple(str(getattr(k, "key", k)) for k in p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@contextlib.contextmanager
def _adapter_dir(dst: str | Path, force: bool) -> Iterator[Path]:
    """A temp folder beside `dst` that replaces it only when the block succeeds. An existing non-empty `dst` is
    replaced only with `force`, and only when it is an adapter folder (no files but the adapter's)."""
    real = Path(os.path.realpath(dst))
    if real.exists() and not real.is_dir():
        raise CheckpointError(f"{dst}: destination exists and is not a folder")
    if real.is_dir() and any(real.iterdir()):
        if not force:
            raise CheckpointError(f"{dst}: destination exists and is not empty; use --force (force=True) to "
                                  "overwrite it")
        others = sorted(p.name for p in real.iterdir() if p.name not in _ADAPTER_FILES)
        if others or not (real / CONFIG_FILE).is_file():
            what = f"it holds {others[:3]}" if others else f"no {CONFIG_FILE}"
            raise CheckpointError(f"{dst}: destination is not a PEFT adapter folder ({what}); refusing to replace it "
                                  "even with --force")
    with replace_dir(real) as tmp:
        yield tmp


def _our_adapters(params: Mapping[str, Any], cfg: ModelConfig, lcfg: LoraConfig) -> dict[tuple[str, ...], Any]:
    """The adapter leaves of `params` (adapters alone or joined with the base; scanned or per-layer) by path
    in the scanned tree, checked against cfg and lcfg (WeightError naming the param)."""
    adapters = lora_lib.split(params)[0]
    if "layers" not in adapters and "layers_0" in adapters:    # per-layer tree: stacked on the host
        layers = [adapters.get(f"layers_{i}", {}) for i in range(cfg.n_layers)]
        adapters = {"layers": {m: {k: np.stack([host_array(layer.get(m, {}).get(k)) for layer in layers])
                                   for k in adapters["layers_0"][m]} for m in adapters["layers_0"]}}
    got, want = _leaves(adapters), adapter_shapes(cfg, lcfg)
    for p in sorted(set(got) | set(want)):
        where = "/".join(p)
        if p not in got:
            raise WeightError(f"params: adapter '{where}' of LoRA targets {lcfg.targets} is missing")
        if p not in want:
            raise WeightError(f"params: adapter '{where}' is not one of LoRA targets {lcfg.targets}")
        if tuple(np.shape(got[p])) != want[p]:
            raise WeightError(f"params: adapter '{where}' has shape {tuple(np.shape(got[p]))}, the model config "
                              f"and rank {lcfg.rank} want {want[p]}")
    return got


def save_peft_adapter(folder: str | Path, cfg: ModelConfig, params: Mapping[str, Any], lcfg: LoraConfig,
                      base_model_name_or_path: str | Path | None = None, dtype: Any = None,
                      force: bool = False) -> Path:
    """Writes our LoRA adapters as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors),
    which appears only when complete; `peft.PeftModel.from_pretrained(<HF model of the base>, folder)` then
    computes what our adapted model computes.

    params: the adapters (any tree holding them: alone, or joined with the base; scanned or per-layer).
    dtype: of the stored tensors (None: the adapters' own). NaN/inf adapters are refused (CheckpointError).
    Every process must call it when the adapters are sharded over several; process 0 writes.
    """
    from mistral_jax.checkpoint.torch_write import write_safetensors
    ours = {p: host_array(x) for p, x in _our_adapters(params, cfg, lcfg).items()}
    if jax.process_index() != 0:
        return Path(folder)
    out_dtype = parse_dtype(dtype if dtype is not None else next(iter(ours.values())).dtype, "dtype")
    shapes = _peft_shapes(cfg, lcfg)
    source = {peft_key(i, t, f): (("layers", _MODULE[t], t + s), i)
              for t in lcfg.targets for f, s in (("A", LORA_A_SUFFIX), ("B", LORA_B_SUFFIX))
              for i in range(cfg.n_layers)}

    def tensor(key: str) -> np.ndarray:
        path, layer = source[key]
        x = ours[path][layer]
        r = lcfg.rank
        y = x.reshape(-1, r).T if path[-1].endswith(LORA_A_SUFFIX) else x.reshape(r, -1).T  # A^T, B^T
        with np.errstate(over="ignore"):     # an overflowing cast is reported by check_values, naming the key
            y = y.astype(out_dtype)
        check_values(y, key, "adapter export", before=x)
        return y

    with _adapter_dir(folder, force) as tmp:
        write_adapter_config(tmp, lcfg, None if base_model_name_or_path is None else str(base_model_name_or_path))
        write_safetensors(tmp / WEIGHTS_FILE, [(k, s, out_dtype) for k, s in shapes.items()], tensor,
                          metadata={"format": "pt"})
    return Path(folder)


def _weights_file(folder: Path) -> Any:
    """The adapter's tensors: adapter_model.safetensors, else PEFT's older adapter_model.bin."""
    from mistral_jax.checkpoint.torch_read import SafetensorsFile, TorchFile
    if (folder / WEIGHTS_FILE).is_file():
        return SafetensorsFile(folder / WEIGHTS_FILE)
    if (folder / LEGACY_WEIGHTS_FILE).is_file():
        return TorchFile(folder / LEGACY_WEIGHTS_FILE)
    raise CheckpointError(f"{folder / WEIGHTS_FILE}: not found (nor {LEGACY_WEIGHTS_FILE}); a PEFT adapter "
                          f"folder holds {CONFIG_FILE} and its weights")


def load_peft_adapter(folder: str | Path, cfg: ModelConfig, dtype: Any = np.float32
                      ) -> tuple[LoraConfig, dict[str, Any]]:
    """(our LoraConfig, the adapters as a nested dict of numpy arrays in our scanned layout, e.g.
    {"layers": {"attention": {"wq_lora_a": (L, D, r), "wq_lora_b": (L, r, N, H)}, ...}}) of a PEFT LoRA
    adapter folder for the model `cfg`; `lora.join` them with the base params to run or train them.

    CheckpointError naming the file and field, or the tensor, for everything `read_adapter_config` refuses
    and for missing, unexpected, mis-shaped, non-float or non-finite tensors.
    """
    folder = Path(folder)
    lcfg, raw = read_adapter_config(folder, cfg)
    src = _weights_file(folder)
    name = src.path
    try:
        want = _peft_shapes(cfg, lcfg)
        keys = set(src.keys())
        missing, extra = sorted(set(want) - keys), sorted(keys - set(want))
        modules = f"field 'target_modules' {raw.get('target_modules')} of {CONFIG_FILE}"
        if missing:
            raise CheckpointError(f"{name}: tensor '{missing[0]}' is missing ({len(missing)} missing in all) for "
                                  f"{modules} over {cfg.n_layers} layers")
        if extra:
            raise CheckpointError(f"{name}: unexpected tensor '{extra[0]}' ({len(extra)} in all) for {modules}")
        for key, shape in want.items():
            if tuple(src.shape(key)) != shape:
                raise CheckpointError(f"{name}: tensor '{key}' has shape {tuple(src.shape(key))}; field 'r' "
                                      f"({lcfg.rank}) of {CONFIG_FILE} and the model config want {shape}")
            if src.dtype(key).kind != "f" and src.dtype(key).name != "bfloat16":
                raise CheckpointError(f"{name}: tensor '{key}' has dtype {src.dtype(key)}, not a float type")
        out_dtype = np.dtype(dtype)
        tree: dict[str, Any] = {"layers": {}}
        for t in lcfg.targets:
            d_in, d_out = _io_shapes(cfg, t)
            a = np.empty((cfg.n_layers, *d_in, lcfg.rank), out_dtype)
            b = np.empty((cfg.n_layers, lcfg.rank, *d_out), out_dtype)
            for i in range(cfg.n_layers):
                a_peft, b_peft = src.read(peft_key(i, t, "A")), src.read(peft_key(i, t, "B"))
                check_values(a_peft, peft_key(i, t, "A"), str(name))
                check_values(b_peft, peft_key(i, t, "B"), str(name))
                a[i] = a_peft.T.reshape(*d_in, lcfg.rank)
                b[i] = b_peft.T.reshape(lcfg.rank, *d_out)
            module = tree["layers"].setdefault(_MODULE[t], {})
            module[t + LORA_A_SUFFIX], module[t + LORA_B_SUFFIX] = a, b
    finally:
        src.close()
    return lcfg, tree


def merge_peft_adapter(params: Mapping[str, Any], cfg: ModelConfig, folder: str | Path,
                       in_place: bool = False) -> dict[str, Any]:
    """The base `params` (scanned, no adapters) with the PEFT adapter of `folder` merged: each adapted
    W + (lora_alpha / r) A B, in W's dtype and sharding (`lora.merge`). With `in_place`, the base weights
    are overwritten instead of copied (`lora.merge_in_place`: the base must not be used afterwards)."""
    lcfg, adapters = load_peft_adapter(folder, cfg)
    joined = lora_lib.join(adapters, params)
    return lora_lib.merge_in_place(joined, lcfg) if in_place else lora_lib.merge(joined, lcfg)


def describe(lcfg: LoraConfig) -> str:
    """One line for logs: rank, alpha and the HF module names of an adapter."""
    return f"LoRA r={lcfg.rank} lora_alpha={lcfg.alpha:g} on {', '.join(HF_NAMES[t] for t in lcfg.targets)}"


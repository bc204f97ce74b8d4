"""Params trees by name: a leaf's "a/b/c" name from its key path, a tree as a flat {name: leaf} dict, and one
param as a host array."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mistral_jax.runtime.distributed import to_host


def key_name(k: Any) -> str:
    """One entry of a tree key path (a dict key entry, or a plain string) as a string."""
    return str(getattr(k, "key", k))


def param_name(kpath: tuple) -> str:
    """"layers/attention/wq" from a tree key path (dict key entries, or plain strings)."""
    return "/".join(key_name(k) for k in kpath)


def flat_params(tree: Any) -> dict[str, Any]:
    """{param name: leaf} of a nested params tree, in tree order."""
    return {param_name(kpath): leaf for kpath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def host_array(leaf: Any) -> np.ndarray:
    """One param as a host numpy array, gathered from every process when it is sharded over several."""
    if jax.process_count() > 1:
        return to_host(leaf)
    return np.asarray(jax.device_get(leaf))

"""The parameter and compute dtypes this library accepts, parsed in one place."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from mistral_jax.errors import DtypeError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def parse_dtype(name: Any, what: str = "dtype") -> np.dtype:
    """'float32' | 'bfloat16' | 'float16' (or an equivalent numpy/jax dtype) -> numpy dtype.

    `what` names the field or flag in the error message (e.g. '--dtype', "[model] field 'dtype'").
    """
    try:
        dt = np.dtype(ml_dtypes.bfloat16) if name in ("bfloat16", jnp.bfloat16) else np.dtype(name)
    except (TypeError, ValueError):
        raise DtypeError(f"{what}: unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        raise DtypeError(f"{what}: unsupported dtype {dt}; use one of {', '.join(DTYPE_NAMES)}")
    return dt


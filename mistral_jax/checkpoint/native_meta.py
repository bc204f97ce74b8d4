"""The native format's folder files: config.json (config fields, format marker, param dtype) and
checksums.json (a sha256 of every param's bytes and a copy of config.json's fields), and the (scanned)
params tree a config calls for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn

from mistral_jax.checkpoint.formats import NATIVE_MARKER
from mistral_jax.checkpoint.integrity import ALGORITHM
from mistral_jax.checkpoint.weights import check_shape
from mistral_jax.errors import CheckpointError, WeightError
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.param_tree import flat_params
from mistral_jax.model.transformer import abstract_params
from mistral_jax.runtime.files import read_json_object

FORMAT_VERSION = 3  # the one version read and written
CHECKSUMS = "checksums.json"
CONFIG_COPY = "config"  # checksums.json's copy of config.json's fields


def check_tree(cfg: ModelConfig, got: dict[str, Any], source: str) -> None:
    """Raises WeightError naming the first param whose presence or shape differs from the config's scanned
    tree."""
    want = {k: tuple(v.shape) for k, v in flat_params(nn.unbox(abstract_params(cfg))).items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    if missing:
        raise WeightError(f"{source}: missing param(s) {missing[:5]} ({len(missing)} in all)")
    if unexpected:
        raise WeightError(f"{source}: unexpected param(s) {unexpected[:5]} ({len(unexpected)} in all); "
                          "does the config match the params?")
    for k, shape in want.items():
        check_shape(source, k, got[k].shape, shape, what="param")


def _read_checksums_file(path: Path) -> dict[str, Any]:
    """checksums.json of a native folder: {"algorithm", "tensors": {param: digest}, "config": {field: value}}."""
    source = path / CHECKSUMS
    try:
        d = json.loads(source.read_text())
        algorithm, digests = d["algorithm"], d["tensors"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: cannot read checksums ({type(e).__name__}: {e})") from None
    if algorithm != ALGORITHM:
        raise CheckpointError(f"{source}: field 'algorithm' is {algorithm!r}, this library checks {ALGORITHM!r}")
    if not isinstance(digests, dict):
        raise CheckpointError(f"{source}: field 'tensors' must be an object, got {type(digests).__name__}")
    if CONFIG_COPY not in d:
        raise CheckpointError(f"{source}: field '{CONFIG_COPY}' (the copy of config.json) is missing; this library "
                              f"reads native format version {FORMAT_VERSION}, whose checksums.json holds it")
    if not isinstance(d[CONFIG_COPY], dict):
        raise CheckpointError(f"{source}: field '{CONFIG_COPY}' must be an object, got "
                              f"{type(d[CONFIG_COPY]).__name__}")
    return d


def _same_value(a: Any, b: Any) -> bool:
    """JSON values equal in meaning (10000 and 10000.0 are; true and 1 are not)."""
    return a == b and isinstance(a, bool) == isinstance(b, bool) and (a is None) == (b is None)


def _check_config_copy(path: Path, fields: Mapping[str, Any], sums: Mapping[str, Any]) -> None:
    """CheckpointError naming the first field of config.json that differs from checksums.json's copy of it
    (the config as saved)."""
    source, sums_path = path / "config.json", path / CHECKSUMS
    saved = sums[CONFIG_COPY]
    hint = (f"{source.name} was changed after the checkpoint was saved: restore it, or adopt the change with "
            f"`mistral-jax convert --no-verify {path} NEW_FOLDER`")
    for k in [*fields, *(k for k in saved if k not in fields)]:
        if k not in saved:
            raise CheckpointError(f"{source}: field '{k}' ({fields[k]!r}) is not in the config saved with the "
                                  f"checkpoint ({sums_path}); {hint}")
        if k not in fields:
            raise CheckpointError(f"{source}: field '{k}' is missing; {sums_path} recorded {saved[k]!r} when the "
                                  f"checkpoint was saved; {hint}")
        if not _same_value(fields[k], saved[k]):
            raise CheckpointError(f"{source}: field '{k}' is {fields[k]!r}, but {sums_path} recorded {saved[k]!r} "
                                  f"when the checkpoint was saved; {hint}")


def read_native_meta(path: str | Path, verify: bool = True) -> tuple[ModelConfig, str, dict[str, Any] | None]:
    """(config, stored param dtype name, checksums.json or None) of a native folder.

    With `verify`, config.json is checked against checksums.json's copy of it and the checksums are returned
    (None without `verify`)."""
    path = Path(path)
    source = path / "config.json"
    d = read_json_object(source, CheckpointError)
    version = d.get(NATIVE_MARKER)
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise CheckpointError(f"{source}: field '{NATIVE_MARKER}' is {version!r}, this library reads "
                              f"version(s) {FORMAT_VERSION}")
    sums = None
    if verify:
        sums = _read_checksums_file(path)
        _check_config_copy(path, d, sums)
    d.pop(NATIVE_MARKER)
    if "param_dtype" not in d:
        raise CheckpointError(f"{source}: missing field 'param_dtype'")
    dtype = d.pop("param_dtype")
    return ModelConfig.from_dict(d, source=str(source)), dtype, sums


def param_digests(path: Path, sums: Mapping[str, Any], names: list[str]) -> dict[str, str]:
    """The stored digest of every param in `names`; CheckpointError if checksums.json lacks one."""
    digests = sums["tensors"]
    missing = [k for k in names if k not in digests]
    if missing:
        raise CheckpointError(f"{path / CHECKSUMS}: no checksum for param(s) {missing[:5]} ({len(missing)} in all)")
    return digests

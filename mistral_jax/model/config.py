"""Model configuration: a frozen dataclass, named presets, and readers for HF / mistral-inference files."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

from mistral_jax.errors import ConfigError
from mistral_jax.runtime.files import read_json_object

CONFIGS_DIR = Path(__file__).resolve().parent / "presets"  # package data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Mistral-style decoder-only transformer."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    max_seq_len: int = 32768
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size",
                     "max_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"model config field '{name}' must be a positive integer, got {value!r}", name)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config field 'n_kv_heads'={self.n_kv_heads} must divide 'n_heads'={self.n_heads}",
                "n_kv_heads")
        if self.head_dim % 2:
            raise ConfigError(f"model config field 'head_dim'={self.head_dim} must be even for rotary embeddings",
                              "head_dim")
        if self.sliding_window is not None and (not _is_int(self.sliding_window) or self.sliding_window < 1):
            raise ConfigError(
                f"model config field 'sliding_window' must be a positive integer or None, got {self.sliding_window!r}",
                "sliding_window")
        if not (_is_number(self.norm_eps) and 0 < self.norm_eps < 1):
            raise ConfigError(f"model config field 'norm_eps' must be a number in (0, 1), got {self.norm_eps!r}",
                              "norm_eps")
        if not (_is_number(self.rope_theta) and self.rope_theta > 1):
            raise ConfigError(f"model config field 'rope_theta' must be a number > 1, got {self.rope_theta!r}",
                              "rope_theta")
        for name in ("bos_id", "eos_id"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"model config field '{name}' must be an integer token id in "
                                  f"[0, vocab_size={self.vocab_size}), got {value!r}", name)
        # one representation for equal configs (they are jit static arguments): 10000 -> 10000.0
        object.__setattr__(self, "norm_eps", float(self.norm_eps))
        object.__setattr__(self, "rope_theta", float(self.rope_theta))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "ModelConfig":
        """Builds a config from our own field names; unknown fields are an error."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a mapping of model config fields, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"{source}: unknown model config field(s) {unknown}; known: {sorted(fields)}")
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise ConfigError(f"{source}: missing model config field(s) {missing}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}", e.field) from None

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def with_rope_theta(self, rope_theta: float | None, source: str) -> tuple["ModelConfig", list[str]]:
        """(config with rope_theta overridden, notes): the one place an override is applied and reported."""
        if rope_theta is None:
            return self, []
        if not _is_number(rope_theta) or rope_theta <= 1:
            raise ConfigError(f"rope_theta override for {source} must be a number > 1, got {rope_theta!r}",
                              "rope_theta")
        if float(rope_theta) == self.rope_theta:
            return self, []
        note = f"rope_theta overridden: {source} says {self.rope_theta}, using {float(rope_theta)}"
        return self.replace(rope_theta=float(rope_theta)), [note]

    # ----- presets and foreign formats -----

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """A named preset from mistral_jax/model/presets/<name>.json (e.g. 'mistral-7b-v0.1', 'tiny')."""
        path = CONFIGS_DIR / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
            raise ConfigError(f"unknown model preset {name!r}; known presets: {known}")
        return cls.from_dict(_read_json(path), source=str(path))

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any] | str | Path) -> "ModelConfig":
        """From a Hugging Face MistralConfig `config.json` (dict or path).

        A null `num_key_value_heads`, `head_dim`, `sliding_window`, `bos_token_id` or `eos_token_id` means
        the same as an absent one (n_heads, dim / n_heads, no window, 1, 2); a list-valued `eos_token_id`
        gives its first id.
        """
        source = "config.json"
        if isinstance(d, (str, Path)):
            source = str(d)
            d = _read_json(Path(d))
        _require_mapping(d, source)
        if d.get("model_type", "mistral") != "mistral":
            raise ConfigError(f"{source}: field 'model_type' is {d.get('model_type')!r}, expected 'mistral'")
        tie = d.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ConfigError(f"{source}: field 'tie_word_embeddings' must be true or false, got {tie!r}")
        if tie:
            raise ConfigError(f"{source}: field 'tie_word_embeddings' is true; Mistral has an untied output head")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' is {d.get('hidden_act')!r}, only 'silu' is supported")
        _require(d, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
                 source)
        dim = _int_field(d, "hidden_size", source)
        n_heads = _int_field(d, "num_attention_heads", source)
        kw = dict(
            dim=dim, n_layers=_int_field(d, "num_hidden_layers", source), n_heads=n_heads,
            n_kv_heads=_int_field(d, "num_key_value_heads", source, n_heads, null_is_default=True),
            head_dim=_head_dim(d, "head_dim", dim, "hidden_size", n_heads, "num_attention_heads", source),
            hidden_dim=_int_field(d, "intermediate_size", source), vocab_size=_int_field(d, "vocab_size", source),
            norm_eps=_number_field(d, "rms_norm_eps", source, 1e-6), rope_theta=_hf_rope_theta(d, source),
            sliding_window=_window(d.get("sliding_window"), source),
            max_seq_len=_int_field(d, "max_position_embeddings", source, 32768),
            bos_id=_token_id(d, "bos_token_id", source, 1), eos_id=_token_id(d, "eos_token_id", source, 2))
        return _build(cls, kw, _HF_NAMES, source)

    def to_hf_config(self) -> dict[str, Any]:
        """The equivalent Hugging Face `config.json` dict."""
        return {
            "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.hidden_dim, "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "sliding_window": self.sliding_window, "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu", "tie_word_embeddings": False,
            "bos_token_id": self.bos_id, "eos_token_id": self.eos_id,
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        }

    @classmethod
    def from_params_json(cls, d: Mapping[str, Any] | str | Path,
                         rope_theta: float | None = None) -> tuple["ModelConfig", list[str]]:
        """From a mistral-inference `params.json`; returns (config, notes about inferred values).

        v0.1's params.json has no rope_theta: it is inferred as 1e4 only when the file has a sliding
        window (and that is reported in the notes); otherwise a missing theta is an error unless
        `rope_theta` is passed. A `rope_theta` that differs from the file's is applied with a note.
        """
        source = "params.json"
        if isinstance(d, (str, Path)):
            source = str(d)
            d = _read_json(Path(d))
        _require_mapping(d, source)
        notes: list[str] = []
        _require(d, ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size"), source)
        if d.get("moe") or d.get("lora"):
            raise ConfigError(f"{source}: MoE / LoRA params.json fields are not supported")
        dim = _int_field(d, "dim", source)
        n_heads = _int_field(d, "n_heads", source)
        window = _window(d.get("sliding_window"), source)
        if rope_theta is not None and (not _is_number(rope_theta) or rope_theta <= 1):
            raise ConfigError(f"{source}: rope_theta override must be a number > 1, got {rope_theta!r}")
        theta = d.get("rope_theta")
        override = rope_theta
        if theta is None:
            if rope_theta is not None:      # nothing in the file to override: the caller's value, no note
                theta, override = rope_theta, None
            elif window is None:
                raise ConfigError(
                    f"{source}: field 'rope_theta' is missing and there is no sliding window to infer it from "
                    "(v0.1 used 1e4, v0.2+ 1e6); pass rope_theta explicitly (--rope-theta)")
            else:
                theta = 10000.0
                notes.append(f"{source} has no 'rope_theta'; inferred 10000.0 (Mistral 7B v0.1, sliding window "
                             f"{window}). Override with --rope-theta if this is wrong.")
        elif not _is_number(theta):
            raise ConfigError(f"{source}: field 'rope_theta' must be a number, got {theta!r}")
        seq_key = "max_seq_len" if "max_seq_len" in d else "max_position_embeddings"
        kw = dict(
            dim=dim, n_layers=_int_field(d, "n_layers", source), n_heads=n_heads,
            n_kv_heads=_int_field(d, "n_kv_heads", source, n_heads, null_is_default=True),
            head_dim=_head_dim(d, "head_dim", dim, "dim", n_heads, "n_heads", source),
            hidden_dim=_int_field(d, "hidden_dim", source), vocab_size=_int_field(d, "vocab_size", source),
            norm_eps=_number_field(d, "norm_eps", source, 1e-5), rope_theta=theta, sliding_window=window,
            max_seq_len=_int_field(d, seq_key, source, 32768))
        cfg = _build(cls, kw, {**_PARAMS_NAMES, "max_seq_len": seq_key}, source)
        cfg, override_notes = cfg.with_rope_theta(override, source)
        return cfg, notes + override_notes

    def to_params_json(self) -> dict[str, Any]:
        """The equivalent mistral-inference `params.json` dict (rope_theta always written)."""
        d: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
        }
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
        return d


# ModelConfig field -> the field of each foreign file it comes from (for error messages)
_HF_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "hidden_dim": "intermediate_size",
             "vocab_size": "vocab_size", "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta",
             "sliding_window": "sliding_window", "max_seq_len": "max_position_embeddings",
             "bos_id": "bos_token_id", "eos_id": "eos_token_id"}
_PARAMS_NAMES = {"dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
                 "head_dim": "head_dim", "hidden_dim": "hidden_dim", "vocab_size": "vocab_size",
                 "norm_eps": "norm_eps", "rope_theta": "rope_theta", "sliding_window": "sliding_window"}
_MISSING = object()


def _build(cls: type, kw: dict[str, Any], names: Mapping[str, str], source: str) -> Any:
    """cls(**kw), with ModelConfig's own errors re-raised naming the file and the file's field."""
    try:
        return cls(**kw)
    except ConfigError as e:
        field = names.get(e.field, e.field)
        raise ConfigError(f"{source}: field '{field}': {e}", e.field) from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return read_json_object(path, ConfigError)


def _require_mapping(d: Any, source: str) -> None:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")


def _require(d: Mapping[str, Any], keys: tuple[str, ...], source: str) -> None:
    for key in keys:
        if key not in d:
            raise ConfigError(f"{source}: missing field '{key}'")


def _int_field(d: Mapping[str, Any], key: str, source: str, default: Any = _MISSING,
               null_is_default: bool = False) -> int:
    """d[key] (or `default` when absent, or null with `null_is_default`), which must be a positive integer."""
    value = d.get(key, default)
    if value is None and null_is_default:
        value = default
    if value is _MISSING:
        raise ConfigError(f"{source}: missing field '{key}'")
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{source}: field '{key}' must be a positive integer, got {value!r}")
    return value


def _number_field(d: Mapping[str, Any], key: str, source: str, default: float) -> float:
    value = d.get(key, default)
    if not _is_number(value):
        raise ConfigError(f"{source}: field '{key}' must be a number, got {value!r}")
    return float(value)


def _hf_rope_theta(d: Mapping[str, Any], source: str) -> float:
    """rope_theta from the top level (legacy) or `rope_parameters` (transformers 5); they must agree."""
    rope_params = d.get("rope_parameters")
    if rope_params is None:
        rope_params = {}
    if not isinstance(rope_params, Mapping):
        raise ConfigError(f"{source}: field 'rope_parameters' must be an object, got {rope_params!r}")
    rope_type = rope_params.get("rope_type", "default")
    if rope_type != "default":
        raise ConfigError(f"{source}: field 'rope_parameters.rope_type' is {rope_type!r}, only 'default' is supported")
    scaling = d.get("rope_scaling")
    if scaling is not None and not (isinstance(scaling, Mapping)
                                    and scaling.get("rope_type", scaling.get("type")) == "default"):
        raise ConfigError(f"{source}: field 'rope_scaling' is {scaling!r}; only unscaled (default) RoPE is supported")
    top, nested = d.get("rope_theta"), rope_params.get("rope_theta")
    for key, value in (("rope_theta", top), ("rope_parameters.rope_theta", nested)):
        if value is not None and not (_is_number(value) and value > 1):
            raise ConfigError(f"{source}: field '{key}' must be a number > 1, got {value!r}")
    if top is not None and nested is not None and float(top) != float(nested):
        raise ConfigError(f"{source}: fields 'rope_theta'={top!r} and 'rope_parameters.rope_theta'={nested!r} "
                          "disagree")
    theta = top if top is not None else nested
    return 10000.0 if theta is None else float(theta)


def _token_id(d: Mapping[str, Any], key: str, source: str, default: int) -> int:
    """A token id field; null or absent gives `default`, a non-empty list of ids gives its first.

    The range check against the vocabulary is ModelConfig's.
    """
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, list):
        if not value or not all(_is_int(v) for v in value):
            raise ConfigError(f"{source}: field '{key}' must be a token id or a non-empty list of token ids, "
                              f"got {value!r}")
        return value[0]
    if not _is_int(value):
        raise ConfigError(f"{source}: field '{key}' must be an integer token id, got {value!r}")
    return value


def _head_dim(d: Mapping[str, Any], key: str, dim: int, dim_key: str, n_heads: int, heads_key: str,
              source: str) -> int:
    """The explicit head_dim field, else dim / heads (which must divide)."""
    if d.get(key) is not None:
        return _int_field(d, key, source)
    if dim % n_heads:
        raise ConfigError(f"{source}: '{heads_key}'={n_heads!r} does not divide '{dim_key}'={dim!r}"
                          f" and no '{key}' is given")
    return dim // n_heads


def _window(value: Any, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):  # some params.json files store it as a string
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"{source}: field 'sliding_window' is {value!r}, not an integer") from None
    if isinstance(value, list):  # per-layer windows (later Mistral models): only uniform ones supported
        if len(set(map(repr, value))) != 1:
            raise ConfigError(f"{source}: field 'sliding_window' has per-layer values {value}; not supported")
        value = value[0]
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{source}: field 'sliding_window' must be a positive integer or null, got {value!r}")
    return value

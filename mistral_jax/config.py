"""Model configuration: a frozen dataclass, named presets, and readers for HF / mistral-inference files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


class ConfigError(ValueError):
    """A model configuration is malformed or inconsistent; the message names the field."""


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
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model config field '{name}' must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config field 'n_kv_heads'={self.n_kv_heads} must divide 'n_heads'={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model config field 'head_dim'={self.head_dim} must be even for rotary embeddings")
        if self.sliding_window is not None and (
                isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int)
                or self.sliding_window < 1):
            raise ConfigError(
                f"model config field 'sliding_window' must be a positive integer or None, got {self.sliding_window!r}")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise ConfigError(f"model config field 'norm_eps' must be in (0, 1), got {self.norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            raise ConfigError(f"model config field 'rope_theta' must be > 1, got {self.rope_theta!r}")

    @property
    def queries_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "ModelConfig":
        """Builds a config from our own field names; unknown fields are an error."""
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
            raise ConfigError(f"{source}: {e}") from None

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def with_rope_theta(self, rope_theta: float | None, source: str) -> tuple["ModelConfig", list[str]]:
        """(config with rope_theta overridden, notes): the one place an override is applied and reported."""
        if rope_theta is None or float(rope_theta) == self.rope_theta:
            return self, []
        note = f"rope_theta overridden: {source} says {self.rope_theta}, using {float(rope_theta)}"
        return self.replace(rope_theta=float(rope_theta)), [note]

    # ----- presets and foreign formats -----

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """A named preset from configs/models/<name>.json (e.g. 'mistral-7b-v0.1', 'tiny')."""
        path = CONFIGS_DIR / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))
            raise ConfigError(f"unknown model preset {name!r}; known presets: {known}")
        return cls.from_dict(json.loads(path.read_text()), source=str(path))

    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any] | str | Path) -> "ModelConfig":
        """From a Hugging Face MistralConfig `config.json` (dict or path)."""
        source = "config.json"
        if isinstance(d, (str, Path)):
            source = str(d)
            d = _read_json(Path(d))
        if d.get("model_type", "mistral") != "mistral":
            raise ConfigError(f"{source}: field 'model_type' is {d.get('model_type')!r}, expected 'mistral'")
        if d.get("tie_word_embeddings", False):
            raise ConfigError(f"{source}: field 'tie_word_embeddings' is true; Mistral has an untied output head")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' is {d.get('hidden_act')!r}, only 'silu' is supported")
        _require(d, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
                 source)
        n_heads = d["num_attention_heads"]
        head_dim = _head_dim(d, "hidden_size", "num_attention_heads", source)
        theta = d.get("rope_theta")
        rope_params = d.get("rope_parameters") or {}
        if theta is None:
            theta = rope_params.get("rope_theta", 10000.0)
        rope_type = rope_params.get("rope_type", "default")
        if rope_type != "default":
            raise ConfigError(f"{source}: field 'rope_parameters.rope_type' is {rope_type!r}, only 'default' is supported")
        window = _window(d.get("sliding_window"), source)
        try:
            return cls(
                dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=n_heads,
                n_kv_heads=d.get("num_key_value_heads") or n_heads, head_dim=head_dim,
                hidden_dim=d["intermediate_size"], vocab_size=d["vocab_size"],
                norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), sliding_window=window,
                max_seq_len=d.get("max_position_embeddings", 32768),
                bos_id=d.get("bos_token_id", 1) if d.get("bos_token_id") is not None else 1,
                eos_id=_first(d.get("eos_token_id", 2)))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

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
        `rope_theta` is passed.
        """
        source = "params.json"
        if isinstance(d, (str, Path)):
            source = str(d)
            d = _read_json(Path(d))
        notes: list[str] = []
        _require(d, ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size"), source)
        if d.get("moe") or d.get("lora"):
            raise ConfigError(f"{source}: MoE / LoRA params.json fields are not supported")
        n_heads = d["n_heads"]
        head_dim = _head_dim(d, "dim", "n_heads", source)
        window = _window(d.get("sliding_window"), source)
        theta = d.get("rope_theta")
        if rope_theta is not None:
            if theta is not None and float(theta) != float(rope_theta):
                notes.append(f"rope_theta overridden: file says {theta}, using {rope_theta}")
            theta = rope_theta
        elif theta is None:
            if window is None:
                raise ConfigError(
                    f"{source}: field 'rope_theta' is missing and there is no sliding window to infer it from "
                    "(v0.1 used 1e4, v0.2+ 1e6); pass rope_theta explicitly (--rope-theta)")
            theta = 10000.0
            notes.append(f"{source} has no 'rope_theta'; inferred 10000.0 (Mistral 7B v0.1, sliding window "
                         f"{window}). Override with --rope-theta if this is wrong.")
        try:
            cfg = cls(dim=d["dim"], n_layers=d["n_layers"], n_heads=n_heads,
                      n_kv_heads=d.get("n_kv_heads") or n_heads, head_dim=head_dim,
                      hidden_dim=d["hidden_dim"], vocab_size=d["vocab_size"],
                      norm_eps=float(d.get("norm_eps", 1e-5)), rope_theta=float(theta), sliding_window=window,
                      max_seq_len=d.get("max_seq_len", d.get("max_position_embeddings", 32768)))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg, notes

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


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _require(d: Mapping[str, Any], keys: tuple[str, ...], source: str) -> None:
    for key in keys:
        if key not in d:
            raise ConfigError(f"{source}: missing field '{key}'")


def _head_dim(d: Mapping[str, Any], dim_key: str, heads_key: str, source: str) -> int:
    """The explicit 'head_dim', else dim / heads (which must divide)."""
    if d.get("head_dim") is not None:
        return d["head_dim"]
    if not isinstance(d[heads_key], int) or d[heads_key] < 1 or d[dim_key] % d[heads_key]:
        raise ConfigError(f"{source}: '{heads_key}'={d[heads_key]!r} does not divide '{dim_key}'={d[dim_key]!r}"
                          " and no 'head_dim' is given")
    return d[dim_key] // d[heads_key]


def _window(value: Any, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):  # some params.json files store it as a string
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"{source}: field 'sliding_window' is {value!r}, not an integer") from None
    if isinstance(value, list):  # per-layer windows (later Mistral models): only uniform ones supported
        if len(set(value)) != 1:
            raise ConfigError(f"{source}: field 'sliding_window' has per-layer values {value}; not supported")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{source}: field 'sliding_window' must be a positive integer or null, got {value!r}")
    return value


def _first(v: Any) -> int:
    return v[0] if isinstance(v, list) else v

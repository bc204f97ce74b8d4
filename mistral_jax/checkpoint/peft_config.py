"""`adapter_config.json` of a PEFT LoRA adapter folder: written from our LoRA config, and read back into one
after refusing (one line naming the file and field) every setting that would make the adapter compute
something other than y = x W^T + (lora_alpha / r) x A^T B^T on the projections this library adapts."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

from mistral_jax.errors import CheckpointError
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.lora_config import TARGETS, LoraConfig, lora_rank_error
from mistral_jax.runtime.files import read_json_object

CONFIG_FILE = "adapter_config.json"
# our projection -> its module in Hugging Face's MistralDecoderLayer; PEFT's target_modules use the last part
HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
              "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
HF_NAMES = {t: m.split(".")[-1] for t, m in HF_MODULES.items()}
_OTHER_LINEAR = ("model.embed_tokens", "lm_head")    # the model's other weight modules: never adapted here
ALL_LINEAR = "all-linear"                             # PEFT's shorthand: every linear layer but the output
TASK_TYPES = ("CAUSAL_LM", None)

# Settings that change the adapter's computation or its tensors, refused when set (anything but false/null/empty).
_REFUSED = {
    "use_dora": "DoRA (weight-decomposed) adapters are not supported",
    "use_rslora": "rank-stabilised scaling (lora_alpha / sqrt(r)) is not supported",
    "lora_bias": "LoRA bias terms are not supported",
    "fan_in_fan_out": "transposed (Conv1D-style) weights are not supported",
    "use_qalora": "QA-LoRA adapters are not supported", "use_bdlora": "block-diagonal LoRA is not supported",
    "kasa_config": "KaSA adapters are not supported", "monteclora_config": "MonteCLoRA adapters are not supported",
    "arrow_config": "Arrow routing is not supported", "alora_invocation_tokens": "activated LoRA is not supported",
    "rank_pattern": "per-module ranks are not supported", "alpha_pattern": "per-module alphas are not supported",
    "modules_to_save": "fully trained extra modules are not supported",
    "trainable_token_indices": "trained token embeddings are not supported",
    "target_parameters": "adapters on parameters are not supported", "exclude_modules": "excluded modules are not "
    "supported", "layer_replication": "layer replication is not supported",
}


def _show(value: Any) -> str:
    """A config value as the JSON file spells it (true, null, "IA3")."""
    return json.dumps(value)


def _refuse(path: Path, field: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: field '{field}' is {_show(value)}: {why}")


def adapter_config_dict(lcfg: LoraConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    """PEFT's adapter_config.json fields for our adapters (plain LoRA, every layer, HF module names)."""
    alpha = int(lcfg.alpha) if float(lcfg.alpha).is_integer() else float(lcfg.alpha)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "revision": None, "inference_mode": True, "r": lcfg.rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": [HF_NAMES[t] for t in lcfg.targets], "exclude_modules": None, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None,
    }


def write_adapter_config(folder: Path, lcfg: LoraConfig, base_model_name_or_path: str | None) -> None:
    """Writes folder/adapter_config.json (the caller makes the folder appear atomically)."""
    text = json.dumps(adapter_config_dict(lcfg, base_model_name_or_path), indent=2) + "\n"
    (Path(folder) / CONFIG_FILE).write_text(text)


def _matcher(path: Path, value: Any) -> Callable[[str], bool]:
    """PEFT's rule for target_modules: a list matches a module whose name is, or ends in '.' + an entry; a
    string is a regular expression matched against the whole name ("all-linear": every linear layer but
    the output)."""
    if isinstance(value, str):
        if value.lower() == ALL_LINEAR:
            return lambda name: name != "lm_head" and name.split(".")[-1] in HF_NAMES.values()
        try:
            pattern = re.compile(value)
        except re.error as e:
            raise _refuse(path, "target_modules", value, f"not a valid regular expression ({e})") from None
        return lambda name: pattern.fullmatch(name) is not None
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return lambda name: any(name == x or name.endswith("." + x) for x in value)
    raise _refuse(path, "target_modules", value, "expected a non-empty list of module names or a regular expression")


def _targets(path: Path, value: Any, cfg: ModelConfig) -> tuple[str, ...]:
    """Our projections named by target_modules, which must adapt each of them in every layer or in none."""
    supported = ", ".join(HF_NAMES.values())
    if isinstance(value, list):     # each entry must name one of our projections
        ours = [f"model.layers.{i}.{m}" for m in HF_MODULES.values() for i in range(cfg.n_layers)]
        for x in value:
            if not isinstance(x, str) or not any(n == x or n.endswith("." + x) for n in ours):
                raise _refuse(path, "target_modules", value, f"{x!r} is not a projection this library adapts "
                              f"(supported: {supported})")
    match = _matcher(path, value)
    for other in _OTHER_LINEAR:
        if match(other):
            raise _refuse(path, "target_modules", value, f"it adapts '{other}'; only {supported} are supported")
    targets = []
    for t in TARGETS:
        layers = [i for i in range(cfg.n_layers) if match(f"model.layers.{i}.{HF_MODULES[t]}")]
        if layers and len(layers) < cfg.n_layers:
            raise _refuse(path, "target_modules", value, f"it adapts {HF_NAMES[t]} in layers {layers} only; "
                          f"adapters must cover all {cfg.n_layers} layers")
        if layers:
            targets.append(t)
    if not targets:
        raise _refuse(path, "target_modules", value, f"it matches none of {supported}")
    return tuple(targets)


def _check_layers(path: Path, value: Any, cfg: ModelConfig) -> None:
    """layers_to_transform: null, or every layer of the model."""
    if value is None:
        return
    layers = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(layers, list) or sorted(set(layers)) != list(range(cfg.n_layers)):
        raise _refuse(path, "layers_to_transform", value, f"adapters must cover all {cfg.n_layers} layers (null)")


def read_adapter_config(folder: str | Path, cfg: ModelConfig) -> tuple[LoraConfig, dict[str, Any]]:
    """(our LoraConfig, the raw JSON dict) of folder/adapter_config.json, for the model `cfg`.

    CheckpointError naming the file and field for: a file that is missing or not a JSON object; peft_type
    other than LORA; a task_type other than CAUSAL_LM or null; r or lora_alpha that are not positive (or r
    too large for cfg's projections); target_modules naming modules we do not adapt, or only some layers;
    bias other than "none"; and any setting of `_REFUSED` (DoRA, rsLoRA, LoRA bias, per-module ranks, ...).
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; a PEFT adapter folder holds {CONFIG_FILE} and its weights")
    raw = read_json_object(path, CheckpointError)
    if raw.get("peft_type") != "LORA":
        raise _refuse(path, "peft_type", raw.get("peft_type"), "only LORA adapters are supported")
    if raw.get("task_type") not in TASK_TYPES:
        raise _refuse(path, "task_type", raw.get("task_type"), "only CAUSAL_LM (or null) adapters are supported")
    for field, why in _REFUSED.items():
        if raw.get(field) not in (None, False, {}, []):
            raise _refuse(path, field, raw[field], why)
    if raw.get("bias", "none") != "none":
        raise _refuse(path, "bias", raw.get("bias"), 'bias terms are not supported (only "none")')
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise _refuse(path, "r", r, "expected an integer >= 1")
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
            or alpha <= 0):
        raise _refuse(path, "lora_alpha", alpha, "expected a finite number > 0")
    _check_layers(path, raw.get("layers_to_transform"), cfg)
    lcfg = LoraConfig(rank=r, alpha=float(alpha), targets=_targets(path, raw.get("target_modules"), cfg))
    error = lora_rank_error(lcfg.rank, lcfg.targets, cfg)
    if error:
        raise _refuse(path, "r", r, error.replace("lora.rank", "r"))
    return lcfg, raw


def check_run_lora(adapter: LoraConfig, folder: str | Path, rank: int | None = None, alpha: float | None = None,
                   targets: Sequence[str] | None = None) -> LoraConfig:
    """`adapter` (from `read_adapter_config`) once the run's own LoRA settings agree with it: each of rank,
    alpha and targets that the run sets (None: not set) must equal the file's value; else a CheckpointError
    naming the file's field and the run's setting."""
    path = Path(folder) / CONFIG_FILE
    if rank is not None and rank != adapter.rank:
        raise CheckpointError(f"{path}: field 'r' is {adapter.rank} but the run sets lora.rank = {rank}")
    if alpha is not None and float(alpha) != adapter.alpha:
        raise CheckpointError(f"{path}: field 'lora_alpha' is {adapter.alpha:g} but the run sets lora.alpha = "
                              f"{float(alpha):g}")
    if targets is not None and set(targets) != set(adapter.targets):
        raise CheckpointError(f"{path}: field 'target_modules' adapts {list(adapter.targets)} "
                              f"({[HF_NAMES[t] for t in adapter.targets]}) but the run sets lora.targets = "
                              f"{list(targets)}")
    return adapter


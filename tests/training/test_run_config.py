"""Run configs: TOML + --set overrides, range checks with errors naming file/section/field, resume rules,
and the mesh built with jax.make_mesh."""

from pathlib import Path

import jax
import pydantic
import pytest
from jax.sharding import AxisType

from mistral_jax.training import run_config as rc_lib
from mistral_jax.model import sharding

TINY_TOML = Path(__file__).resolve().parents[2] / "configs" / "pretrain-tiny.toml"
DEFAULT_TOML = TINY_TOML.with_name("pretrain-default.toml")


def _err(overrides, toml=TINY_TOML) -> str:
    with pytest.raises(rc_lib.RunConfigError) as e:
        rc_lib.load(toml, overrides)
    return str(e.value)


def test_overrides_bare_keys_and_types():
    rc = rc_lib.load(TINY_TOML, ["steps=7", "optim.lr=1", "model.dtype=bfloat16", "data.paths=['a', 'b']",
                                 "model.overrides.dim=32"])
    assert rc.train.steps == 7 and rc.optim.lr == 1.0 and isinstance(rc.optim.lr, float)
    assert rc.model.dtype == "bfloat16" and rc.data.paths == ("a", "b")
    assert rc.model_cfg().dim == 32
    assert rc_lib.from_dict(rc.to_dict()) == rc  # to_dict is JSON-able and round-trips
    with pytest.raises(pydantic.ValidationError):
        rc.train.steps = 3  # frozen
    assert rc_lib.load(DEFAULT_TOML).model_cfg().dim == 256


@pytest.mark.parametrize("override, message", [
    ("optim.b1=2.0", "[optim] field 'b1': Input should be less than 1 (got 2.0)"),
    ("optim.b2=1.0", "[optim] field 'b2': Input should be less than 1 (got 1.0)"),
    ("optim.b1=-0.1", "[optim] field 'b1': Input should be greater than or equal to 0"),
    ("optim.eps=0", "[optim] field 'eps': Input should be greater than 0 (got 0)"),
    ("optim.weight_decay=-1", "[optim] field 'weight_decay': Input should be greater than or equal to 0"),
    ("optim.clip_norm=-1.0", "[optim] field 'clip_norm'"),
    ("optim.lr=0", "[optim] field 'lr': Input should be greater than 0"),
    ("optim.min_lr_ratio=1.5", "[optim] field 'min_lr_ratio'"),
    ("optim.schedule_steps=-1", "[optim] field 'schedule_steps'"),
    ("mesh.devices=-2", "[mesh] field 'devices': Input should be greater than or equal to 0 (got -2)"),
    ("mesh.fsdp=0", "[mesh] field 'fsdp': must be a positive integer or -1"),
    ("mesh.tensor=-3", "[mesh] field 'tensor': must be a positive integer or -1"),
    ("mesh.data=-1", "[mesh]: at most one of data, fsdp, tensor may be -1"),
    ("data.seq_len=4096", "[model] max_seq_len=1024 is below data.seq_len=4096"),
    ("data.val_percent=100", "[data] field 'val_percent': Input should be less than 100"),
    ("data.seed=-1", "[data] field 'seed'"),
    ("data.source=web",
     "[data] field 'source': Input should be 'stdlib', 'files', 'chat' or 'chat-examples' (got 'web')"),
    ("data.source=files", "[data] field 'paths': must list files/globs"),
    ("train.steps=0", "[train] field 'steps': Input should be greater than or equal to 1 (got 0)"),
    ("train.peak_flops=-1", "[train] field 'peak_flops'"),
    ("train.progress=yes", "[train] field 'progress': Input should be a valid boolean (got 'yes')"),
    ("checkpoint.keep=0", "[checkpoint] field 'keep'"),
    ("eval.sample_temperature=-0.5", "[eval] field 'sample_temperature'"),
    ("model.dtype=float64", "[model] field 'dtype': Input should be 'float32', 'bfloat16' or 'float16'"),
    ("optim.lr='fast'", "[optim] field 'lr': Input should be a valid number (got 'fast')"),
    ("steps=1.5", "[train] field 'steps': Input should be a valid integer (got 1.5)"),
    ("grad_accum=3", "[optim] field 'grad_accum': 3 must divide data.batch_size=8"),
    ("optim.learning_rate=1", "[optim] field 'learning_rate': unknown field; known: ["),
    ("model.overrides.dimm=1", "[model] field 'overrides'"),
    ("model.overrides.n_kv_heads=3", "[model]: model config field 'n_kv_heads'=3 must divide"),
    ("model.preset=nope", "[model]: unknown model preset 'nope'"),
])
def test_bad_values_name_file_section_and_field(override, message):
    msg = _err([override])
    assert msg.startswith(f"{TINY_TOML}: "), msg
    assert message in msg, msg
    assert "\n" not in msg  # one line per error


def test_several_errors_one_line_each(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nb1 = 2.0\neps = 0.0\n[oops]\nx = 1\n[mesh]\ndevices = -2\n")
    lines = _err([], bad).splitlines()
    assert len(lines) == 4 and all(line.startswith(f"{bad}: ") for line in lines)
    assert any("unknown section [oops]" in line for line in lines)
    bad.write_text("optim = 3\n")
    assert "[optim] must be a table of fields, got 3" in _err([], bad)
    bad.write_text("[optim\n")
    assert "invalid TOML" in _err([], bad)
    assert "run config not found" in _err([], tmp_path / "missing.toml")


def test_set_syntax_errors():
    assert "ambiguous (in sections ['data', 'train'])" in _err(["seed=1"])
    assert "key 'nope' is unknown" in _err(["nope=1"])
    assert "expected key=value" in _err(["steps"])
    assert "unknown section 'foo'" in _err(["foo.bar=1"])


def test_resume_changes_names_fixed_fields_only():
    rc = rc_lib.load(TINY_TOML)
    saved_run, saved_model = rc.to_dict(), rc.model_cfg().to_dict()
    assert rc_lib.resume_changes(saved_run, saved_model, rc) == []
    allowed = rc_lib.load(TINY_TOML, ["train.steps=50", "train.log_every=5", "checkpoint.every=7", "eval.batches=0",
                                      "mesh.devices=4", "optim.grad_accum=2", "optim.schedule_steps=9",
                                      "model.remat='full'", "train.seed=3"])
    assert rc_lib.resume_changes(saved_run, saved_model, allowed) == []
    changed = rc_lib.load(TINY_TOML, ["model.overrides.dim=128", "data.seq_len=32", "optim.weight_decay=0.0",
                                      "model.param_dtype=bfloat16", "data.shuffle_files=3"])
    assert sorted(rc_lib.resume_changes(saved_run, saved_model, changed)) == sorted([
        "model.dim 64 -> 128", "data.seq_len 64 -> 32", "optim.weight_decay 0.1 -> 0.0",
        "model.param_dtype 'float32' -> 'bfloat16'", "data.shuffle_files 2 -> 3"])


def test_remat_policy_names():
    """remat is "none" | "full" | "dots"."""
    assert rc_lib.load(TINY_TOML).model.remat == "none"
    assert rc_lib.load(DEFAULT_TOML).model.remat == "none"
    for raw, want in (("'dots'", "dots"), ("'full'", "full"), ("none", "none")):
        assert rc_lib.load(TINY_TOML, [f"model.remat={raw}"]).model.remat == want
    assert "[model] field 'remat'" in _err(["model.remat=true"])
    err = _err(["model.remat='dot'"])
    assert "[model] field 'remat'" in err and "'none', 'full' or 'dots'" in err and "'dot'" in err
    assert "[model] field 'remat'" in _err(["model.remat=1"])


def test_make_mesh_uses_auto_axes_and_infers_minus_one():
    mesh = sharding.make_mesh(2, -1, 2, devices=jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices()[:8])
    assert dict(sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2]).shape)["fsdp"] == 2
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="6 devices not divisible by data\\*fsdp\\*tensor=4"):
        sharding.make_mesh(2, -1, 2, devices=jax.devices()[:6])
    with pytest.raises(ValueError, match="needs 4 devices, have 8"):
        sharding.make_mesh(1, 4, 1, devices=jax.devices()[:8])


def test_lora_init_from_takes_the_adapter_settings_the_config_leaves_unset(tmp_path):
    from mistral_jax.checkpoint.peft_config import write_adapter_config
    from mistral_jax.errors import RunError
    from mistral_jax.model.lora_config import LoraConfig
    from mistral_jax.training.run_setup import lora_config

    write_adapter_config(tmp_path, LoraConfig(rank=2, alpha=8.0, targets=("wq", "wv")), None)
    rc = rc_lib.load(TINY_TOML, [f"lora.init_from={tmp_path}"]).replace(optim={"schedule_steps": 3})
    assert lora_config(rc, rc.model_cfg()) == LoraConfig(rank=2, alpha=8.0, targets=("wq", "wv"))
    rc = rc_lib.load(TINY_TOML, [f"lora.init_from={tmp_path}", "lora.targets=['wq']"]).replace(train={"steps": 2})
    with pytest.raises(RunError) as e:           # set explicitly (kept through replace): must agree
        lora_config(rc, rc.model_cfg())
    assert str(e.value) == (f"lora.init_from {tmp_path / 'adapter_config.json'}: field 'target_modules' adapts "
                            "['wq', 'wv'] (['q_proj', 'v_proj']) but the run sets lora.targets = ['wq']")

"""LoRA adapters as PEFT adapter folders (issue 21, point 2), checked against peft itself: our adapters saved
and loaded by `PeftModel.from_pretrained` on our HF export of the base give our LoRA model's logits; an
adapter made by peft, loaded or merged by us, gives peft's logits and `merge_and_unload()` weights; every
unsupported setting is refused in one line naming the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.checkpoint import peft as peft_io
from mistral_jax.checkpoint.native import load_params
from mistral_jax.checkpoint.torch_write import write_hf
from mistral_jax.checkpoint.weights import tensor_specs
from mistral_jax.errors import CheckpointError, WeightError
from mistral_jax.model import lora
from mistral_jax.model.transformer import forward

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

TOL = 1e-4
SEQ = 24                    # longer than the reference model's sliding window (16)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
PEFT_TARGETS = ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"]   # a subset, made by peft (test 2)


def _hf_model(folder: Path):
    from transformers import MistralForCausalLM
    return MistralForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _logits(params, tokens: np.ndarray, cfg, lcfg=None) -> np.ndarray:
    return np.asarray(forward(params, jnp.asarray(tokens), cfg, lora=lcfg))


def _one_line(e: pytest.ExceptionInfo, *words: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(2, SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def base(hf_gqa):
    """(cfg, params) of the session's random HF model, read by our loader."""
    return load_params(hf_gqa.path, progress=False)


@pytest.fixture(scope="module")
def ours(base):
    """Our base params joined with LCFG adapters whose B is random (non-zero) too."""
    cfg, params = base
    joined = lora.add_adapters(params, cfg, LCFG, jax.random.key(1))
    adapters, frozen = lora.split(joined)
    keys = iter(jax.random.split(jax.random.key(2), 64))
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.random.normal(next(keys), x.shape, x.dtype) * 0.3
        if str(p[-1].key).endswith(lora.B_SUFFIX) else x, adapters)
    return lora.join(adapters, frozen)


@pytest.fixture(scope="module")
def saved(base, ours, tmp_path_factory) -> Path:
    cfg, _ = base
    return peft_io.save_peft_adapter(tmp_path_factory.mktemp("peft") / "adapter", cfg, ours, LCFG,
                                     base_model_name_or_path="org/base-model")


@pytest.fixture(scope="module")
def hf_export(base, tmp_path_factory) -> Path:
    """Our HF export of the base."""
    cfg, params = base
    return write_hf(tmp_path_factory.mktemp("peft") / "hf", cfg, params, progress=False, tokenizer=None)


@pytest.fixture(scope="module")
def peft_made(hf_gqa, tmp_path_factory):
    """An adapter made by peft itself (random non-zero B) on a subset of projections: (folder, peft's logits
    unmerged, its merge_and_unload() model)."""
    torch.manual_seed(0)
    model = peft.get_peft_model(_hf_model(hf_gqa.path), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=PEFT_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.eval()
    folder = tmp_path_factory.mktemp("peft") / "made"
    model.save_pretrained(folder)
    return folder, model


# ----- out: our adapters -> PEFT -----

def test_saved_adapter_runs_in_peft_on_our_hf_export(base, ours, saved, hf_export, tokens):
    """(1) PeftModel.from_pretrained(our HF export of the base, our adapter folder) == our LoRA forward."""
    cfg, params = base
    want = _logits(ours, tokens, cfg, LCFG)
    assert np.abs(want - _logits(params, tokens, cfg)).max() > 100 * TOL      # the adapters change the model
    model = peft.PeftModel.from_pretrained(_hf_model(hf_export), saved).eval()
    got = _torch_logits(model, tokens)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_saved_folder_has_peft_key_names_and_config(base, ours, saved, hf_export, tmp_path):
    """The folder matches what peft's save_pretrained writes for the same adapters: file names, keys, shapes,
    values and the config fields that matter."""
    from safetensors.numpy import load_file
    model = peft.PeftModel.from_pretrained(_hf_model(hf_export), saved)
    model.save_pretrained(tmp_path / "again")
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    mine, theirs = load_file(saved / peft_io.WEIGHTS_FILE), load_file(tmp_path / "again" / peft_io.WEIGHTS_FILE)
    assert sorted(mine) == sorted(theirs)
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in mine
    for k in theirs:
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)
    cfg_mine = json.loads((saved / "adapter_config.json").read_text())
    cfg_theirs = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    for field in ("peft_type", "task_type", "r", "lora_alpha", "bias", "use_dora", "use_rslora", "fan_in_fan_out",
                  "lora_dropout", "base_model_name_or_path"):
        assert cfg_mine[field] == cfg_theirs[field], field
    assert sorted(cfg_mine["target_modules"]) == sorted(cfg_theirs["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert cfg_mine["base_model_name_or_path"] == "org/base-model"


def test_round_trip_and_layouts(base, ours, saved):
    """load(save(adapters)) == adapters; the shapes are the model's own; per-layer trees save the same."""
    from safetensors.numpy import load_file
    import flax.linen as nn
    from mistral_jax.model.transformer import abstract_params
    cfg, _ = base
    lcfg, back = peft_io.load_peft_adapter(saved, cfg)
    assert lcfg == LCFG
    want = lora.split(ours)[0]
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), want, back)
    abstract = lora.split(nn.unbox(abstract_params(cfg, lora=LCFG)))[0]
    assert peft_io.adapter_shapes(cfg, LCFG) == {p: tuple(x.shape) for p, x in peft_io._leaves(abstract).items()}
    per_layer = {f"layers_{i}": jax.tree_util.tree_map(lambda x, i=i: x[i], want["layers"])
                 for i in range(cfg.n_layers)}
    out = peft_io.save_peft_adapter(saved.parent / "per_layer", cfg, per_layer, LCFG)
    a, b = load_file(saved / peft_io.WEIGHTS_FILE), load_file(out / peft_io.WEIGHTS_FILE)
    assert all(np.array_equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)


def test_b_rows_follow_the_weight_rows_of_the_hf_export(base, ours, saved):
    """For every adapted projection (q/k included), B_peft @ A_peft is exactly the HF-layout image of our
    A @ B under weights.py's own mapping of that weight (the rotate-half row order of q_proj/k_proj)."""
    from safetensors.numpy import load_file
    cfg, _ = base
    tensors = load_file(saved / peft_io.WEIGHTS_FILE)
    adapters = peft_io._leaves(lora.split(ours)[0])
    target_of = {("attention", t): t for t in ("wq", "wk", "wv", "wo")}
    target_of.update({("feed_forward", t): t for t in ("w1", "w2", "w3")})
    checked = 0
    for spec in tensor_specs(cfg, "hf"):
        t = target_of.get(spec.path[1:]) if spec.layer is not None else None
        if t is None:
            continue
        a = np.asarray(adapters[("layers", *spec.path[1:-1], t + lora.A_SUFFIX)][spec.layer], np.float64)
        b = np.asarray(adapters[("layers", *spec.path[1:-1], t + lora.B_SUFFIX)][spec.layer], np.float64)
        delta_ours = np.tensordot(a, b, axes=1)                      # (in..., out...), our layout
        a_p = tensors[peft_io.peft_key(spec.layer, t, "A")].astype(np.float64)
        b_p = tensors[peft_io.peft_key(spec.layer, t, "B")].astype(np.float64)
        np.testing.assert_allclose(b_p @ a_p, spec.from_ours(delta_ours), rtol=1e-6, atol=1e-9, err_msg=spec.key)
        checked += 1
    assert checked == 7 * cfg.n_layers


def test_save_refuses_bad_adapters_and_destinations(base, ours, saved, tmp_path):
    cfg, _ = base
    with pytest.raises(WeightError) as e:
        peft_io.save_peft_adapter(tmp_path / "x", cfg, ours, lora.LoraConfig(rank=4, targets=("wq", "wk")))
    _one_line(e, "wo_lora_a")
    with pytest.raises(WeightError) as e:
        peft_io.save_peft_adapter(tmp_path / "x", cfg, ours, lora.LoraConfig(rank=2))
    _one_line(e, "shape")
    adapters = lora.split(ours)[0]
    bad = jax.tree_util.tree_map(lambda x: x, adapters)
    bad["layers"]["attention"]["wv_lora_b"] = jnp.asarray(bad["layers"]["attention"]["wv_lora_b"]).at[1, 0].set(
        jnp.nan)
    with pytest.raises(CheckpointError) as e:
        peft_io.save_peft_adapter(tmp_path / "x", cfg, bad, LCFG)
    _one_line(e, "layers.1.self_attn.v_proj.lora_B.weight")
    assert not (tmp_path / "x").exists()                              # nothing half-written
    with pytest.raises(CheckpointError) as e:
        peft_io.save_peft_adapter(saved, cfg, ours, LCFG)
    _one_line(e, str(saved), "--force")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError) as e:
        peft_io.save_peft_adapter(other, cfg, ours, LCFG, force=True)
    _one_line(e, "notes.txt")
    assert (other / "notes.txt").read_text() == "keep me"
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    peft_io.save_peft_adapter(copy, cfg, ours, LCFG, force=True, dtype="bfloat16")   # an adapter folder: replaced
    assert json.loads((copy / "adapter_config.json").read_text())["r"] == 4
    _, half = peft_io.load_peft_adapter(copy, cfg)                                 # bfloat16 tensors read back
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, np.asarray(y), rtol=1e-2, atol=1e-3),
                           half, adapters)
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy", "other"]       # no temp folders left


# ----- in: an adapter made by peft -> ours -----

def test_peft_adapter_merged_by_us_equals_merge_and_unload(base, peft_made, tokens, tmp_path):
    """(2) Our merge of peft's adapter into the base == peft's merge_and_unload(): logits and exported weights."""
    cfg, params = base
    folder, model = peft_made
    unmerged = _torch_logits(model, tokens)
    lcfg, adapters = peft_io.load_peft_adapter(folder, cfg)
    assert lcfg == lora.LoraConfig(rank=4, alpha=16.0, targets=("wq", "wk", "wo", "w2", "w3"))
    np.testing.assert_allclose(_logits(lora.join(adapters, params), tokens, cfg, lcfg), unmerged, atol=TOL, rtol=0)

    merged = peft_io.merge_peft_adapter(params, cfg, folder)
    import copy
    reference = copy.deepcopy(model).merge_and_unload().eval()
    want = _torch_logits(reference, tokens)
    assert np.abs(want - _logits(params, tokens, cfg)).max() > 100 * TOL
    np.testing.assert_allclose(_logits(merged, tokens, cfg), want, atol=TOL, rtol=0)
    out = write_hf(tmp_path / "merged_hf", cfg, merged, progress=False, tokenizer=None)
    from safetensors.numpy import load_file
    mine = load_file(out / "model.safetensors")
    for k, v in reference.state_dict().items():
        np.testing.assert_allclose(mine[k], v.numpy(), atol=1e-6, rtol=0, err_msg=k)

    in_place = peft_io.merge_peft_adapter(jax.tree_util.tree_map(jnp.array, params), cfg, folder, in_place=True)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6),
                           in_place, merged)


def test_peft_bin_adapter_and_all_linear(base, peft_made, saved, tmp_path):
    """PEFT's older adapter_model.bin reads the same; target_modules "all-linear" means all seven projections."""
    cfg, _ = base
    folder, model = peft_made
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    want = peft_io.load_peft_adapter(folder, cfg)
    got = peft_io.load_peft_adapter(tmp_path / "bin", cfg)
    assert got[0] == want[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, got[1], want[1])
    copy = _copy(saved, tmp_path / "all", target_modules="all-linear")
    assert peft_io.load_peft_adapter(copy, cfg)[0] == LCFG
    for i, (modules, targets) in enumerate([(r".*\.(q_proj|v_proj)", ("wq", "wv")),
                                            (["self_attn.q_proj", "down_proj"], ("wq", "w2"))]):
        copy = _copy(saved, tmp_path / f"t{i}", target_modules=modules)
        assert peft_io.read_adapter_config(copy, cfg)[0].targets == targets


# ----- refusals -----

def _copy(src: Path, dst: Path, **fields) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / "adapter_config.json").read_text())
    raw.update(fields)
    (dst / "adapter_config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("fields, words", [
    ({"peft_type": "IA3"}, ["'peft_type'", '"IA3"']),
    ({"task_type": "SEQ_CLS"}, ["'task_type'"]),
    ({"use_dora": True}, ["'use_dora'", "true"]),
    ({"use_rslora": True}, ["'use_rslora'"]),
    ({"bias": "all"}, ["'bias'", '"all"']),
    ({"lora_bias": True}, ["'lora_bias'"]),
    ({"fan_in_fan_out": True}, ["'fan_in_fan_out'"]),
    ({"rank_pattern": {"q_proj": 8}}, ["'rank_pattern'"]),
    ({"alpha_pattern": {"q_proj": 8}}, ["'alpha_pattern'"]),
    ({"modules_to_save": ["lm_head"]}, ["'modules_to_save'"]),
    ({"layers_to_transform": [0]}, ["'layers_to_transform'"]),
    ({"target_modules": ["q_proj", "lm_head"]}, ["'target_modules'", "'lm_head'"]),
    ({"target_modules": ["q_proj", "fc1"]}, ["'target_modules'", "'fc1'"]),
    ({"target_modules": ".*"}, ["'target_modules'", "embed_tokens"]),
    ({"target_modules": r"model\.layers\.0\.self_attn\.q_proj"}, ["'target_modules'", "layers [0] only"]),
    ({"target_modules": []}, ["'target_modules'"]),
    ({"r": 0}, ["'r'"]),
    ({"r": 65}, ["'r'", "exceeds"]),
    ({"lora_alpha": -1}, ["'lora_alpha'"]),
    ({"r": 8}, ["'r'", "lora_A.weight", "has shape (4, 64)"]),
    ({"target_modules": ["q_proj", "k_proj"]}, ["unexpected tensor", "'target_modules'"]),
])
def test_unsupported_config_is_refused_in_one_line(base, saved, tmp_path, fields, words):
    """(3) Each refused setting: one line naming the file and the field."""
    cfg, _ = base
    folder = _copy(saved, tmp_path / "a", **fields)
    with pytest.raises(CheckpointError) as e:
        peft_io.load_peft_adapter(folder, cfg)
    msg = _one_line(e, *words)
    assert str(folder) in msg


def test_bad_tensors_and_files_are_refused_in_one_line(base, saved, tmp_path):
    from safetensors.numpy import load_file, save_file
    cfg, _ = base
    tensors = load_file(saved / peft_io.WEIGHTS_FILE)
    key = peft_io.peft_key(1, "w2", "B")

    def with_tensors(name: str, new: dict) -> Path:
        folder = _copy(saved, tmp_path / name)
        save_file(new, str(folder / peft_io.WEIGHTS_FILE), metadata={"format": "pt"})
        return folder

    missing = with_tensors("missing", {k: v for k, v in tensors.items() if k != key})
    extra = with_tensors("extra", {**tensors, "base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)})
    nan = with_tensors("nan", {**tensors, key: np.full_like(tensors[key], np.nan)})
    ints = with_tensors("ints", {**tensors, key: tensors[key].astype(np.int32)})
    for folder, words in [(missing, ["missing", key]), (extra, ["unexpected tensor", "lm_head"]), (nan, [key]),
                          (ints, [key, "int32"])]:
        with pytest.raises(CheckpointError) as e:
            peft_io.load_peft_adapter(folder, cfg)
        _one_line(e, str(folder), *words)
    no_config = tmp_path / "no_config"
    shutil.copytree(saved, no_config)
    (no_config / "adapter_config.json").unlink()
    no_weights = _copy(saved, tmp_path / "no_weights")
    (no_weights / peft_io.WEIGHTS_FILE).unlink()
    not_json = _copy(saved, tmp_path / "not_json")
    (not_json / "adapter_config.json").write_text("{r: 4")
    for folder, words in [(no_config, ["adapter_config.json", "not found"]),
                          (no_weights, [peft_io.WEIGHTS_FILE, "not found"]), (not_json, ["not valid JSON"])]:
        with pytest.raises(CheckpointError) as e:
            peft_io.load_peft_adapter(folder, cfg)
        _one_line(e, str(folder), *words)


def test_run_settings_are_checked_against_the_adapter_config(base, saved):
    """lora.init_from: rank, alpha and targets the run sets must be the file's."""
    cfg, _ = base
    lcfg, _ = peft_io.read_adapter_config(saved, cfg)
    assert peft_io.check_run_lora(lcfg, saved) == lcfg
    assert peft_io.check_run_lora(lcfg, saved, rank=4, alpha=8, targets=list(reversed(lora.TARGETS))) == lcfg
    for kw, words in [({"rank": 8}, ["'r' is 4", "lora.rank = 8"]), ({"alpha": 16.0}, ["'lora_alpha' is 8"]),
                      ({"targets": ["wq", "wv"]}, ["'target_modules'", "lora.targets"])]:
        with pytest.raises(CheckpointError) as e:
            peft_io.check_run_lora(lcfg, saved, **kw)
        _one_line(e, "adapter_config.json", *words)


# ----- the convert program (skipped until `--adapter` is wired into it) -----

def test_convert_merges_a_peft_adapter(hf_gqa, peft_made, saved, tokens, tmp_path, capsys):
    """`python -m infer.convert BASE DST --adapter PEFT_DIR` (native and --to hf) == merge_and_unload()."""
    import copy
    from mistral_jax.cli import convert
    if "--adapter" not in convert.build_parser().format_help():
        pytest.skip("convert --adapter is not wired yet")
    folder, model = peft_made
    want = _torch_logits(copy.deepcopy(model).merge_and_unload().eval(), tokens)
    assert convert.main([str(hf_gqa.path), str(tmp_path / "n"), "--adapter", str(folder), "--quiet"]) == 0
    cfg, params = load_params(tmp_path / "n", progress=False)
    np.testing.assert_allclose(_logits(params, tokens, cfg), want, atol=TOL, rtol=0)
    assert convert.main([str(hf_gqa.path), str(tmp_path / "h"), "--to", "hf", "--adapter", str(folder),
                         "--tokenizer", "none", "--quiet"]) == 0
    np.testing.assert_allclose(_torch_logits(_hf_model(tmp_path / "h"), tokens), want, atol=TOL, rtol=0)
    capsys.readouterr()
    dora = _copy(saved, tmp_path / "dora", use_dora=True)
    assert convert.main([str(hf_gqa.path), str(tmp_path / "d"), "--adapter", str(dora), "--quiet"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "'use_dora'" in err[0] and str(dora) in err[0], err
    assert not (tmp_path / "d").exists()

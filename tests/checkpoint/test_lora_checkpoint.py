"""LoRA train checkpoints (issue 18, point 4): they hold the adapters, their optimizer state and the data
position, not the frozen base, and record the base's identity; `--resume` reloads the base from the recorded
path (or draws a random base again from the recorded seed) and refuses a different or missing base in one
line; the final export merges the adapters into the base in place."""

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mistral_jax.model import lora as lora_lib
from mistral_jax.model import transformer as model_lib
from mistral_jax.model import packing
from mistral_jax.model import sharding
from mistral_jax.checkpoint import train_state as tc
from mistral_jax.training import train_step as ts
from mistral_jax.checkpoint.native import load_params, save_params
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.param_tree import flat_params
from mistral_jax.checkpoint.integrity import checkpoint_identity
from mistral_jax.checkpoint.train_state import TrainCheckpointer
from mistral_jax.cli import finetune

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "finetune-tiny.toml"
CFG = ModelConfig.preset("tiny")
LCFG = lora_lib.LoraConfig(rank=4)
MESH = {"mesh.devices": 2, "mesh.fsdp": 2}
QUIET = {"eval.before": "false", "eval.answers": 0, "eval.batches": 0, "eval.export": "false"}


def _argv(run_dir: Path, *extra: str, **sets) -> list[str]:
    argv = ["--config", str(TINY), "--run-dir", str(run_dir)]
    for k, v in {**MESH, "lora.rank": LCFG.rank, **sets}.items():
        argv += ["--set", f"{k}={v}"]
    return argv + list(extra)


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [x for x in err.splitlines() if x.startswith("error:")]


def _save_base(path: Path, seed: int) -> Path:
    save_params(path, CFG, model_lib.init_params(CFG, jax.random.key(seed)), force=True)
    return path


def _saved_state(run_dir: Path, step: int) -> dict:
    ck = TrainCheckpointer(run_dir / "checkpoints")
    try:
        return ck._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        ck.close()


def _read_meta(run_dir: Path, step: int) -> dict:
    ck = TrainCheckpointer(run_dir / "checkpoints")
    try:
        return ck.read_meta(step)[1]
    finally:
        ck.close()


def _abstract_params() -> dict:
    import flax.linen as nn
    return nn.unbox(model_lib.abstract_params(CFG, lora=LCFG))


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def native_base(tmp_path_factory) -> Path:
    return _save_base(tmp_path_factory.mktemp("lora_ckpt") / "base", seed=7)


@pytest.fixture(scope="module")
def lora_run(native_base, tmp_path_factory) -> Path:
    """6 LoRA steps from the native base (checkpoints at 3 and 6), evaluated before and after, exported."""
    run_dir = tmp_path_factory.mktemp("lora_ckpt") / "run"
    assert finetune.main(_argv(run_dir, "--init-from", str(native_base))) == 0
    return run_dir


def _state_keys(directory: Path, step: int) -> list[str]:
    """The '/'-joined paths of the arrays in the saved train state of `step`, from the checkpoint's
    metadata (no array is read)."""
    with ocp.StandardCheckpointer() as reader:
        tree = reader.metadata(directory / str(step) / "state").item_metadata.tree
    return list(flat_params(tree))


@pytest.mark.slow
def test_checkpoint_holds_adapters_and_the_base_identity_not_the_base(lora_run, native_base):
    keys = _state_keys(lora_run / "checkpoints", 6)
    params = [k.split("/")[1:] for k in keys if k.startswith("params/")]
    want = [list(p) for p, _ in lora_lib._leaf_paths(ts.trainable(_abstract_params(), LCFG))]
    assert sorted(params) == sorted(want)                     # every adapter, nothing else
    assert all(lora_lib.is_adapter_path(tuple(p)) for p in params)
    assert not any(k.endswith(("tok_embeddings", "output", "/wq", "/w1", "/scale")) for k in keys), keys
    assert any(k.startswith("opt_state/") for k in keys) and "step" in keys
    meta = _read_meta(lora_run, 6)
    assert meta[tc.BASE_META] == {"kind": "checkpoint", "format": "native", "path": str(native_base.resolve()),
                                  "identity": checkpoint_identity(native_base)}
    ckpt_bytes, base_bytes = _folder_bytes(lora_run / "checkpoints" / "6"), _folder_bytes(native_base / "params")
    print(f"\nLoRA checkpoint {ckpt_bytes:,} bytes, base params {base_bytes:,} bytes "
          f"({ckpt_bytes / base_bytes:.2%})")
    assert ckpt_bytes < 0.05 * base_bytes
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary[tc.BASE_META] == meta[tc.BASE_META]
    assert summary["heldout_answers"] == summary["before_heldout_answers"] == 4


@pytest.mark.slow
def test_export_is_the_base_with_the_adapters_merged(lora_run, native_base):
    """(Also what tests/test_finetune_cli.py checked on a LoRA run of its own from an --init-from checkpoint.)"""
    _, base = load_params(native_base)
    adapters = _saved_state(lora_run, 6)["params"]
    trained, frozen = lora_lib.split(adapters)
    assert jax.tree_util.tree_leaves(trained), "the train state holds adapters"
    assert not jax.tree_util.tree_leaves(frozen), "and not the frozen base"
    assert "merged" in json.loads((lora_run / "summary.json").read_text())["export_note"]
    assert any(np.abs(np.asarray(x)).max() > 0 for p, x in jax.tree_util.tree_leaves_with_path(adapters)
               if "lora_b" in jax.tree_util.keystr(p))                  # B moved off zero
    cfg, merged = load_params(lora_run / "export")
    tokens = np.array([[1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]], np.int32)
    joined = lora_lib.join(jax.tree_util.tree_map(np.asarray, adapters), base)
    want = model_lib.Transformer(cfg, lora=LCFG).apply({"params": joined}, tokens)[0]
    got = model_lib.Transformer(cfg).apply({"params": merged}, tokens)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    _, again = load_params(native_base)   # the merge rewrote the run's copy of the base, not the folder
    for x, y in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(base)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_resume_reloads_the_base_and_matches_the_uninterrupted_run(lora_run, native_base, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(lora_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "6")
    shutil.rmtree(run_dir / "export")
    capsys.readouterr()
    assert finetune.main(_argv(run_dir, "--resume")) == 0
    out = capsys.readouterr().out
    assert f"LoRA base: {native_base.resolve()} (identity {checkpoint_identity(native_base)}, as recorded)" in out
    assert "resumed from step 3" in out
    want, got = _saved_state(lora_run, 6), _saved_state(run_dir, 6)
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))     # adapters, Adam moments, step
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (lora_run, run_dir)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    _, a = load_params(lora_run / "export")
    _, b = load_params(run_dir / "export")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_resume_refuses_another_base_given_with_init_from(lora_run, tmp_path, capsys):
    other = _save_base(tmp_path / "other", seed=8)
    run_dir = tmp_path / "run"
    shutil.copytree(lora_run / "checkpoints", run_dir / "checkpoints")
    capsys.readouterr()
    assert finetune.main(_argv(run_dir, "--resume", "--init-from", str(other), **{"train.steps": 7})) == 1
    errors = _errors(capsys)
    recorded = _read_meta(run_dir, 6)[tc.BASE_META]["identity"]
    assert len(errors) == 1, errors
    assert errors[0] == (f"error: --resume: the LoRA base at {other} is not the base this run trained on: recorded "
                         f"identity {recorded}, found {checkpoint_identity(other)} (a digest of its config and "
                         "checksums)")


@pytest.mark.slow
def test_resume_refuses_a_changed_or_missing_recorded_base(tmp_path, capsys):
    base = _save_base(tmp_path / "base", seed=7)
    run_dir = tmp_path / "run"
    assert finetune.main(_argv(run_dir, "--init-from", str(base), **QUIET, **{"train.steps": 3})) == 0
    recorded = checkpoint_identity(base)
    _save_base(base, seed=9)                             # other weights written over the recorded folder
    found = checkpoint_identity(base)
    assert found != recorded
    capsys.readouterr()
    assert finetune.main(_argv(run_dir, "--resume", **QUIET, **{"train.steps": 4})) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and f"recorded identity {recorded}, found {found}" in errors[0], errors
    assert errors[0].startswith(f"error: --resume: the LoRA base at {base.resolve()} is not the base")
    shutil.rmtree(base)
    assert finetune.main(_argv(run_dir, "--resume", **QUIET, **{"train.steps": 4})) == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"error: --resume: the LoRA base {base.resolve()} that the "
                                                     "checkpoint (step 3 in "), errors
    assert errors[0].endswith("is missing; restore it there or pass --init-from the folder that holds it now")


@pytest.mark.slow
def test_random_base_is_recorded_by_seed_and_drawn_again(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert finetune.main(_argv(run_dir, **QUIET, **{"train.steps": 3, "train.seed": 5})) == 0
    record = _read_meta(run_dir, 3)[tc.BASE_META]
    mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
    drawn = ts.init_base(CFG, jax.random.key(5), mesh, jnp.float32)
    assert record == {"kind": "random", "seed": 5, "path": None, "identity": tc.params_identity(drawn)}
    capsys.readouterr()
    assert finetune.main(_argv(run_dir, "--resume", **QUIET, **{"train.steps": 4})) == 0
    assert f"LoRA base: random weights drawn again from seed 5 (identity {record['identity']})" in \
        capsys.readouterr().out
    meta_file = run_dir / "checkpoints" / "4" / "meta" / "metadata"       # orbax's JSON of the meta item
    meta = json.loads(meta_file.read_text())
    meta[tc.BASE_META]["identity"] = "0123456789abcdef"
    meta_file.write_text(json.dumps(meta))
    assert finetune.main(_argv(run_dir, "--resume", **QUIET, **{"train.steps": 5})) == 1
    errors = _errors(capsys)
    assert errors == [f"error: --resume: the LoRA base drawn again from seed 5 is not the base this run trained on: "
                      f"recorded identity 0123456789abcdef, found {record['identity']} (a digest of its weights' "
                      "checksums)"]


def test_a_hugging_face_base_is_identified_by_its_files(hf_mha):
    record = tc.folder_base_record(hf_mha.path)
    assert record == {"kind": "checkpoint", "format": "hf", "path": str(hf_mha.path.resolve()),
                      "identity": checkpoint_identity(hf_mha.path)}
    weights = hf_mha.path / "model.safetensors"
    st = weights.stat()
    try:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))     # rewritten a second later
        found = checkpoint_identity(hf_mha.path)
        assert found != record["identity"]
        assert tc.base_mismatch(record, found, f"at {hf_mha.path}") == (
            f"the LoRA base at {hf_mha.path} is not the base this run trained on: recorded identity "
            f"{record['identity']}, found {found} (a digest of its files)")
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tc.base_mismatch(record, checkpoint_identity(hf_mha.path), "x") is None


@pytest.mark.slow
def test_the_run_passes_the_base_packed_and_undonated(tmp_path, monkeypatch):
    """A bf16 LoRA run hands its train and eval steps the base packed (uint16 bits, no float32 widening in
    XLA:CPU) as a separate argument, and the train state (donated, checkpointed) holds only adapters."""
    seen: dict[str, list] = {"train": [], "eval": []}

    def spy(make, kind):
        def wrapped(*args, **kw):
            fn = make(*args, **kw)

            def call(*xs):
                seen[kind].append(xs)
                return fn(*xs)
            return call
        return wrapped

    monkeypatch.setattr(ts, "make_train_step", spy(ts.make_train_step, "train"))
    monkeypatch.setattr(ts, "make_eval_step", spy(ts.make_eval_step, "eval"))
    sets = {**QUIET, "eval.batches": 1, "train.steps": 2, "model.dtype": "bfloat16", "model.param_dtype": "bfloat16"}
    assert finetune.main(_argv(tmp_path / "run", **sets)) == 0
    assert len(seen["train"]) == 2 and len(seen["eval"]) == 1
    for state, base, _ in seen["train"]:
        assert all(lora_lib.is_adapter_path(tuple(str(getattr(k, "key", k)) for k in p))
                   for p, _ in jax.tree_util.tree_leaves_with_path(state["params"]))
        assert {x.dtype for x in jax.tree_util.tree_leaves(base)} == {np.dtype(packing.PACKED)}
        assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(base))     # never donated
    _, base, _ = seen["eval"][0]
    assert {x.dtype for x in jax.tree_util.tree_leaves(base)} == {np.dtype(packing.PACKED)}


# ----- the in-place merge behind the export -----

def _adapted(dtype, mesh):
    base = model_lib.init_params(CFG, jax.random.key(0), mesh, dtype)
    adapters = lora_lib.split(lora_lib.add_adapters(base, CFG, LCFG, jax.random.key(1)))[0]
    adapters = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype),
                                      adapters)
    return base, adapters


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_in_place_rewrites_the_base_buffers(dtype):
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    base, adapters = _adapted(dtype, mesh)
    want = jax.device_get(lora_lib.merge(lora_lib.join(adapters, base), LCFG))
    packed = packing.pack(base)
    pointers = [[s.data.unsafe_buffer_pointer() for s in x.addressable_shards] for x in jax.tree_util.tree_leaves(base)]
    got = lora_lib.merge_in_place(lora_lib.join(adapters, base), LCFG)
    assert [[s.data.unsafe_buffer_pointer() for s in x.addressable_shards]
            for x in jax.tree_util.tree_leaves(got)] == pointers                 # no second copy of any weight
    for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(got)), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=0, atol=1e-6)
    w1 = got["layers"]["feed_forward"]["w1"]
    assert w1.sharding == base["layers"]["feed_forward"]["w1"].sharding
    p = packed["layers"]["feed_forward"]["w1"]
    assert np.array_equal(np.asarray(p).view(np.asarray(w1).dtype), np.asarray(w1))   # packed views see it too


@pytest.mark.slow   # one of the everyday subset's longest (issue 20, point 7)
@pytest.mark.as_shipped
def test_merge_on_other_backends_donates_each_weight():
    """What a non-CPU backend gets (here run on CPU): W donated to a per-layer in-place update."""
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    base, adapters = _adapted(jnp.float32, mesh)
    want = np.asarray(lora_lib.merge(lora_lib.join(adapters, base), LCFG)["layers"]["attention"]["wo"])
    w = base["layers"]["attention"]["wo"]
    a, b = adapters["layers"]["attention"]["wo_lora_a"], adapters["layers"]["attention"]["wo_lora_b"]
    args = (w, a, b, jnp.float32(LCFG.scale))
    compiled = lora_lib._merge_donated.lower(*args, nb=1, out_sharding=w.sharding).compile()
    assert compiled.memory_analysis().alias_size_in_bytes == w.nbytes // 4       # each device's shard in place
    got = lora_lib._merge_donated(*args, nb=1, out_sharding=w.sharding)
    assert w.is_deleted() and got.sharding == w.sharding
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)

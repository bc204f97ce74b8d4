"""Train step: learning, sharded == single device, gradient accumulation, packed loss, NaN stop, kill/resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mistral_jax.model import transformer as model_lib
from mistral_jax.training import optim
from mistral_jax.model import sharding
from mistral_jax.training import run_config as rc_lib
from mistral_jax.training import train_step as ts
from mistral_jax.model.config import ModelConfig
from mistral_jax.training.metrics import read_metrics
from mistral_jax.checkpoint.train_state import TrainCheckpointer
from tests.conftest import compile_cache_env, xla_flags
from tests.packed import two_documents

REPO = Path(__file__).resolve().parents[2]
TINY_TOML = REPO / "configs" / "pretrain-tiny.toml"


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.preset("tiny")


def _batch(rows: int, T: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens packed as two documents per row (second starts at T // 3)."""
    return two_documents(rows, T, T // 3, 32000, seed)


def _mesh(data: int, fsdp: int, tensor: int):
    return sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:data * fsdp * tensor])


def _setup(cfg, mesh, lr=1e-3, steps=30, grad_accum=1, eps=1e-8):
    o = rc_lib.OptimSection(lr=lr, warmup_steps=0, grad_accum=grad_accum, eps=eps)
    opt = optim.make_optimizer(o, steps)
    state = ts.init_state(cfg, opt, jax.random.key(0), mesh)
    step = ts.make_train_step(cfg, opt, optim.learning_rate_schedule(o, steps), mesh)
    return state, step


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch(cfg):
    mesh = _mesh(1, 1, 1)
    state, step = _setup(cfg, mesh, lr=3e-3)
    batch = ts.put_batch(_batch(4, 32), mesh, 1)
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[0] > 10.0  # ~ln(32000) at init
    assert losses[-1] < losses[0] - 4.0, losses
    assert int(state["step"]) == 30


@pytest.mark.slow
def test_sharded_step_equals_single_device(cfg):
    assert len(jax.devices()) >= 8, "needs 8 simulated devices (tests/conftest.py)"
    host = _batch(4, 32, seed=1)
    results = {}
    for name, shape in (("single", (1, 1, 1)), ("sharded", (2, 2, 2))):
        mesh = _mesh(*shape)
        # Adam's first update is ~lr * sign(g): with eps=1e-8 it amplifies float32 reduction-order noise in
        # near-zero gradients up to ~1e-5; eps=1e-6 keeps the comparison about sharding, not that.
        state, step = _setup(cfg, mesh, eps=1e-6)
        state, m = step(state, ts.put_batch(host, mesh, 1))
        results[name] = (state, m)
    (s1, m1), (s8, m8) = results["single"], results["sharded"]
    np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s1["params"]), jax.tree_util.tree_leaves(s8["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    # placement follows the logical rules: params and their Adam moments are split over fsdp x tensor.
    wq = s8["params"]["layers"]["attention"]["wq"]      # (L, D, N, H): the layer axis is never split
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None) and not wq.sharding.is_fully_replicated
    assert s8["params"]["tok_embeddings"].sharding.spec == P("tensor", "fsdp")
    moments = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(s8["opt_state"])
               if "'wq'" in jax.tree_util.keystr(p) and "'layers'" in jax.tree_util.keystr(p)]
    assert len(moments) == 2  # mu and nu
    for _, x in moments:
        assert x.sharding.spec == P(None, "fsdp", "tensor", None)
        assert x.addressable_shards[0].data.shape == (cfg.n_layers, cfg.dim // 2, cfg.n_heads // 2, cfg.head_dim)


@pytest.mark.slow
def test_gradient_accumulation_equals_big_batch(cfg):
    mesh = _mesh(1, 2, 1)
    host = _batch(8, 32, seed=2)
    host["segment_ids"][5, 20:] = 0  # some padding, so micro-batches have different token counts
    out = {}
    for k in (1, 4):
        state, step = _setup(cfg, mesh, grad_accum=k, eps=1e-6)
        out[k] = step(state, ts.put_batch(host, mesh, k))
    (s1, m1), (s4, m4) = out[1], out[4]
    assert float(m1["tokens"]) == float(m4["tokens"]) == 8 * 30 - 12
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s1["params"]), jax.tree_util.tree_leaves(s4["params"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=3e-6)


@pytest.mark.slow
def test_packed_row_loss_is_sum_of_document_losses(cfg):
    params = model_lib.init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(4)
    doc_a, doc_b = rng.integers(3, 32000, 11), rng.integers(3, 32000, 21)  # doc_b longer than the window (16)
    loss = jax.jit(lambda p, t, pos, seg: ts.summed_loss(p, t, pos, seg, cfg=cfg))

    def alone(doc):
        n = len(doc)
        return loss(params, doc[None].astype(np.int32), np.arange(n, dtype=np.int32)[None],
                    np.ones((1, n), np.int32))

    row = np.concatenate([doc_a, doc_b, [0, 0, 0]]).astype(np.int32)[None]  # padded to 35
    pos = np.concatenate([np.arange(11), np.arange(21), [0, 0, 0]]).astype(np.int32)[None]
    seg = np.concatenate([np.full(11, 1), np.full(21, 2), [0, 0, 0]]).astype(np.int32)[None]
    packed_sum, packed_n = loss(params, row, pos, seg)
    (a_sum, a_n), (b_sum, b_n) = alone(doc_a), alone(doc_b)
    assert float(packed_n) == float(a_n + b_n) == 10 + 20
    np.testing.assert_allclose(float(packed_sum), float(a_sum + b_sum), rtol=1e-5)
    # without segment ids the second document would see the first: the loss differs.
    unseg_sum, _ = loss(params, row, np.arange(35, dtype=np.int32)[None],
                        np.concatenate([np.ones(32), [0, 0, 0]]).astype(np.int32)[None])
    assert abs(float(unseg_sum) - float(packed_sum)) > 1e-3


def _tiny_overrides(**kw) -> list[str]:
    base = {"mesh.devices": 2, "mesh.fsdp": 2, "train.progress": "false"}
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


POISON = 7  # a token id: a micro-batch whose first token is POISON gets a NaN loss (and NaN gradients)


def _poisoned_loss(params, tokens_BT, positions_BT, segment_ids_BT, **kw):
    s, n = ts.summed_loss(params, tokens_BT, positions_BT, segment_ids_BT, **kw)
    return s * jnp.where(tokens_BT[0, 0] == POISON, jnp.nan, 1.0), n


@pytest.mark.slow
def test_non_finite_step_leaves_state_bit_identical(cfg):
    mesh = _mesh(1, 1, 1)
    o = rc_lib.OptimSection(lr=1e-3, warmup_steps=0)
    opt = optim.make_optimizer(o, 10)
    step = ts.make_train_step(cfg, opt, optim.learning_rate_schedule(o, 10), mesh, loss_fn=_poisoned_loss)
    state = ts.init_state(cfg, opt, jax.random.key(0), mesh)
    good = _batch(2, 16, seed=5)
    good["tokens"][0, 0] = 11
    state, m = step(state, ts.put_batch(good, mesh, 1))  # one real update, so Adam's moments are non-zero
    assert bool(m["finite"])
    before = jax.device_get(state)  # the step donates its input state: keep a host copy
    bad = dict(good, tokens=good["tokens"].copy())
    bad["tokens"][0, 0] = POISON
    state, m = step(state, ts.put_batch(bad, mesh, 1))
    assert not bool(m["finite"]) and np.isnan(float(m["grad_norm"]))  # the gradients are NaN, not only the loss
    after = jax.device_get(state)
    assert jax.tree_util.tree_structure(after) == jax.tree_util.tree_structure(before)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(after), jax.tree_util.tree_leaves(before)):
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{jax.tree_util.keystr(path)} changed"
    assert int(after["step"]) == 1
    state, m = step(state, ts.put_batch(good, mesh, 1))  # and training goes on from there
    assert bool(m["finite"]) and int(state["step"]) == 2


@pytest.mark.slow
def test_cli_reports_nan_with_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from mistral_jax.cli import pretrain

    real_step, real_put = ts.make_train_step, ts.put_batch
    calls = []

    def put_poisoned_at_5(batch, mesh, grad_accum, *rest):  # the 6th batch (step 5) starts with POISON
        calls.append(1)
        if len(calls) == 6:
            batch = dict(batch, tokens=batch["tokens"].copy())
            batch["tokens"][0, 0] = POISON
        return real_put(batch, mesh, grad_accum, *rest)

    monkeypatch.setattr(ts, "make_train_step", lambda *a, **kw: real_step(*a, loss_fn=_poisoned_loss, **kw))
    monkeypatch.setattr(ts, "put_batch", put_poisoned_at_5)
    argv = ["--config", str(TINY_TOML), "--run-dir", str(tmp_path / "run")]
    for s in _tiny_overrides(**{"train.steps": 8, "checkpoint.every": 2, "checkpoint.async_save": "false"}):
        argv += ["--set", s]
    assert pretrain.main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: non-finite training loss at step 5")
    assert "Last good checkpoint: step 4" in errors[0]
    ckpt = TrainCheckpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.latest_step() == 4
    ckpt.close()


# ----- a real subprocess: SIGKILL after a checkpoint, resume, SIGTERM, resume; losses match exactly -----

def _launch(run_dir: Path, steps: int, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "train.pretrain", "--config", str(TINY_TOML), "--run-dir", str(run_dir),
           *sum((["--set", s] for s in _tiny_overrides(**{"train.steps": steps, "checkpoint.every": 4,
                                                           "data.batch_size": 4})), [])]   # half the config's
    if resume:
        cmd.append("--resume")
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu",
               **compile_cache_env())     # the four runs compile the same programs: the later ones load them
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"run exited (rc {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(run_dir / "metrics.jsonl")}


def _last_logged_step(run_dir: Path) -> int:
    records = read_metrics(run_dir / "metrics.jsonl")  # skips a line caught half-written
    return records[-1]["step"] if records else -1


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    steps = 24
    # the uninterrupted reference runs beside the first interrupted run (two cores, two compiles at once)
    full = _launch(tmp_path / "full", steps, resume=False)
    run = tmp_path / "interrupted"
    proc = _launch(run, steps, resume=False)
    _wait_for(lambda: (run / "checkpoints" / "8").is_dir(), proc, "checkpoint 8")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    out, _ = full.communicate(timeout=240)
    assert full.returncode == 0, out

    proc = _launch(run, steps, resume=True)  # resumes from 8 (or 12); then SIGTERM -> checkpoint and exit
    _wait_for(lambda: _last_logged_step(run) >= 14, proc, "step 14")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert "resumed from step" in out and "SIGTERM: saved checkpoint at step" in out
    term_step = int(out.split("SIGTERM: saved checkpoint at step ")[1].split()[0])
    assert term_step >= 14 and (run / "checkpoints" / str(term_step)).is_dir()

    proc = _launch(run, steps, resume=True)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert f"resumed from step {term_step}" in out
    expected, got = _losses(tmp_path / "full"), _losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == expected  # bit-exact losses and grad norms at every step

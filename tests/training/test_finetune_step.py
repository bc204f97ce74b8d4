"""The train step with a per-token target mask (instruction fine-tuning): which tokens the loss counts,
gradient accumulation and sharding with masks; the batch prefetcher; --init-from's config comparison."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.model import transformer as model_lib
from mistral_jax.training import optim
from mistral_jax.model import sharding
from mistral_jax.training import run_config as rc_lib
from mistral_jax.training import train_step as ts
from mistral_jax.checkpoint.native import save_params
from mistral_jax.model.config import ModelConfig
from mistral_jax.runtime.prefetch import Prefetcher
from mistral_jax.training.start_state import load_init_params
from mistral_jax.errors import RunError


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def params(cfg):
    return model_lib.init_params(cfg, jax.random.key(3))


def _chat_rows(rows: int, T: int, seed: int) -> dict[str, np.ndarray]:
    """Rows of two 'conversations' (segments 1, 2, then padding); each has a prompt part (not targets)
    followed by an answer part (targets), at random split points."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((rows, T), np.int32) for k in ts.BATCH_KEYS}
    for r in range(rows):
        a = int(rng.integers(T // 4, T // 2))
        b = int(rng.integers(a + 4, T - 2))
        for seg, (lo, hi) in enumerate(((0, a), (a, b)), 1):
            n = hi - lo
            out["tokens"][r, lo:hi] = rng.integers(3, 32000, n)
            out["positions"][r, lo:hi] = np.arange(n)
            out["segment_ids"][r, lo:hi] = seg
            prompt = int(rng.integers(1, n - 1))
            out["target_mask"][r, lo + prompt:hi] = 1
    return out


def _full_logits_loss(params, cfg, b):
    """The masked loss from full logits, written independently of train_step: sum over positions t whose
    next token is a target of the same segment, of -log p(token[t+1])."""
    logits, _ = model_lib.Transformer(cfg).apply({"params": params}, jnp.asarray(b["tokens"]),
                                                 jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"]))
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    total, count = 0.0, 0
    for r in range(b["tokens"].shape[0]):
        for t in range(b["tokens"].shape[1] - 1):
            seg = b["segment_ids"][r]
            if seg[t] > 0 and seg[t] == seg[t + 1] and b["target_mask"][r, t + 1]:
                total -= float(logp[r, t, b["tokens"][r, t + 1]])
                count += 1
    return total, count


@pytest.mark.slow
def test_masked_loss_counts_exactly_the_targets(cfg, params):
    b = _chat_rows(3, 40, seed=0)
    loss = jax.jit(lambda p, b: ts.summed_loss(p, b["tokens"], b["positions"], b["segment_ids"], cfg=cfg,
                                               target_mask_BT=b["target_mask"], loss_chunk=16))
    got_sum, got_n = loss(params, b)
    want_sum, want_n = _full_logits_loss(params, cfg, b)
    assert float(got_n) == want_n > 0
    np.testing.assert_allclose(float(got_sum), want_sum, rtol=1e-5)

    # The last token of segment 1 is a target; make the token before the answer (a prompt token) the last
    # one of a segment instead: relabelling it changes nothing, relabelling an answer token does.
    r = 0
    end1 = int(np.sum(b["segment_ids"][r] == 1))
    c = {k: v.copy() for k, v in b.items()}
    c["target_mask"][r, end1 - 1] = 0            # now a context token closes segment 1
    base_sum, base_n = loss(params, c)
    d = {k: v.copy() for k, v in c.items()}
    d["tokens"][r, end1 - 1] = (d["tokens"][r, end1 - 1] + 7) % 32000   # its label changes, it is no input
    same_sum, same_n = loss(params, d)
    assert float(same_n) == float(base_n) and float(same_sum) == float(base_sum)
    e = {k: v.copy() for k, v in b.items()}
    e["tokens"][r, end1 - 1] = (e["tokens"][r, end1 - 1] + 7) % 32000   # the same change on a target
    changed_sum, _ = loss(params, e)
    assert abs(float(changed_sum) - float(got_sum)) > 1e-3


@pytest.mark.slow
def test_packed_row_loss_is_sum_of_conversations(cfg, params):
    b = _chat_rows(1, 48, seed=1)
    loss = jax.jit(lambda p, t, pos, seg, m: ts.summed_loss(p, t, pos, seg, cfg=cfg, target_mask_BT=m))
    packed = loss(params, b["tokens"], b["positions"], b["segment_ids"], b["target_mask"])
    parts = []
    for seg in (1, 2):
        sel = b["segment_ids"][0] == seg
        n = int(sel.sum())
        parts.append(loss(params, b["tokens"][:, sel], b["positions"][:, sel], np.ones((1, n), np.int32),
                          b["target_mask"][:, sel]))
    assert float(packed[1]) == float(parts[0][1] + parts[1][1])
    np.testing.assert_allclose(float(packed[0]), float(parts[0][0] + parts[1][0]), rtol=1e-5)


def _mesh(d, f, t):
    return sharding.make_mesh(d, f, t, devices=jax.devices()[:d * f * t])


def _one_step(cfg, mesh, host, grad_accum):
    o = rc_lib.OptimSection(lr=1e-3, warmup_steps=0, grad_accum=grad_accum, eps=1e-6)
    opt = optim.make_optimizer(o, 10)
    state = ts.init_state(cfg, opt, jax.random.key(0), mesh)
    step = ts.make_train_step(cfg, opt, optim.learning_rate_schedule(o, 10), mesh)
    return step(state, ts.put_batch(host, mesh, grad_accum))


@pytest.mark.slow
def test_masked_accumulation_and_mesh_equal_one_big_step(cfg):
    assert len(jax.devices()) >= 8, "needs 8 simulated devices (tests/conftest.py)"
    host = _chat_rows(8, 32, seed=2)
    s1, m1 = _one_step(cfg, _mesh(1, 1, 1), host, 1)
    s4, m4 = _one_step(cfg, _mesh(1, 1, 1), host, 4)
    s8, m8 = _one_step(cfg, _mesh(2, 2, 2), host, 2)
    seg, tgt = host["segment_ids"], host["target_mask"]
    want_n = int(((seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0) & (tgt[:, 1:] > 0)).sum())
    for s, m in ((s4, m4), (s8, m8)):
        assert float(m["tokens"]) == float(m1["tokens"]) == want_n
        np.testing.assert_allclose(float(m["loss"]), float(m1["loss"]), rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(s1["params"]), jax.tree_util.tree_leaves(s["params"])):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_pretraining_batches_train_on_every_token(cfg):
    host = _chat_rows(2, 32, seed=3)
    mesh = _mesh(1, 1, 1)
    no_mask = {k: v for k, v in host.items() if k != "target_mask"}
    placed = ts.put_batch(no_mask, mesh, 1)
    np.testing.assert_array_equal(np.asarray(placed["target_mask"][0]), (host["segment_ids"] > 0).astype(np.int32))


class _Stream:
    def __init__(self, n, fail_at=None):
        self.i, self.n, self.fail_at = 0, n, fail_at
        self.threads = set()

    def __iter__(self):
        return self

    def __next__(self):
        self.threads.add(threading.current_thread().name)
        if self.i == self.fail_at:
            raise ValueError(f"bad line at batch {self.i}")
        if self.i >= self.n:
            raise StopIteration
        self.i += 1
        return {"x": self.i}

    def state(self):
        return {"next": self.i}


def test_prefetcher_pairs_each_batch_with_the_state_after_it():
    s = _Stream(5)
    got = list(Prefetcher(s, lambda b: b["x"] * 10, s.state, depth=2))
    assert got == [(10, {"next": 1}), (20, {"next": 2}), (30, {"next": 3}), (40, {"next": 4}), (50, {"next": 5})]
    assert s.threads == {"batch-prefetch"}   # read in the background thread
    bad = _Stream(5, fail_at=2)
    p = Prefetcher(bad, lambda b: b, bad.state)
    assert next(p)[1] == {"next": 1} and next(p)[1] == {"next": 2}
    with pytest.raises(ValueError, match="bad line at batch 2"):
        next(p)
    p.close()


def test_init_from_compares_architecture_and_notes_the_rest(cfg, params, tmp_path):
    src = save_params(tmp_path / "ckpt", cfg.replace(max_seq_len=cfg.max_seq_len * 4), params)
    mesh = _mesh(1, 1, 1)
    notes = []
    loaded = load_init_params(str(src), cfg, mesh, jnp.float32, notes.append)
    assert notes == [f"--init-from {src}: checkpoint max_seq_len is {cfg.max_seq_len * 4}, the run uses "
                     f"{cfg.max_seq_len}"]
    np.testing.assert_array_equal(np.asarray(loaded["output"]), np.asarray(params["output"]))
    with pytest.raises(RunError, match=r"architecture differs from the run's: rope_theta 10000.0 \(run: 1000000.0\)"):
        load_init_params(str(src), cfg.replace(rope_theta=1e6), mesh, jnp.float32, notes.append)

"""Embedding lookup under data x fsdp sharding: the table's gradient equals the plain take's, on one device
and on a (data=2, fsdp=2, tensor=2) mesh, and the sharded train step compiles without the SPMD partitioner's
"Involuntary full rematerialization" (once the rows and the table's cotangent, issue 19)."""

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mistral_jax.model import embed
from mistral_jax.model import sharding
from mistral_jax.model import transformer as model_lib
from mistral_jax.training import train_step as ts
from mistral_jax.model.config import ModelConfig
from tests.conftest import xla_flags

REPO = Path(__file__).resolve().parents[2]
WARNING = "Involuntary full rematerialization"
V, D, B, T = 64, 32, 8, 16           # 128 tokens from 64 ids: many rows are hit more than once


def _mesh(data: int, fsdp: int, tensor: int):
    return sharding.make_mesh(data, fsdp, tensor, devices=jax.devices()[:data * fsdp * tensor])


def _inputs():
    rs = np.random.RandomState(0)
    table = jnp.asarray(rs.normal(size=(V, D)), jnp.float32)
    tokens = jnp.asarray(rs.randint(0, V, (B, T)), jnp.int32)
    cot = jnp.asarray(rs.normal(size=(B, T, D)), jnp.float32)
    return table, tokens, cot


def _reference_grad(table, tokens, cot, dtype):
    """d/d table of sum(rows * cot) with the plain take, on one device."""
    def f(t):
        return jnp.sum(jnp.take(t, tokens, axis=0).astype(dtype).astype(jnp.float32) * cot)
    return np.asarray(jax.jit(jax.grad(f))(table))


def test_layout_follows_the_rules():
    assert embed.layout() is None                              # no rules, no mesh: the plain take
    with sharding.with_rules():
        assert embed.layout() is None                          # rules without a mesh: constraints are dropped
    with sharding.with_rules(_mesh(2, 2, 2)):
        assert embed.layout() == ("rows", P("data", None, "fsdp"))


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_table_gradient_equals_plain_take(shape, dtype):
    assert len(jax.devices()) >= 8, "needs 8 simulated devices (tests/conftest.py)"
    table, tokens, cot = _inputs()
    ref = _reference_grad(table, tokens, cot, dtype)
    mesh = _mesh(*shape)

    def f(t, tok, c):
        with sharding.with_rules(mesh):
            h = nn.with_logical_constraint(embed.lookup(t, tok, dtype), ("batch", "length", "act_embed"))
            return jnp.sum(h.astype(jnp.float32) * c)

    table_sh = NamedSharding(mesh, P("tensor", "fsdp"))
    grad = jax.jit(jax.grad(f), out_shardings=table_sh)(
        jax.device_put(table, table_sh), jax.device_put(tokens, sharding.batch_sharding(mesh)),
        jax.device_put(cot, sharding.batch_sharding(mesh, 3)))
    assert grad.sharding.spec == P("tensor", "fsdp")
    # the same sums of the same cotangent rows; only their grouping across devices differs
    np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_model_embedding_gradient_equals_plain_take(monkeypatch):
    """The tiny model's loss gradient for tok_embeddings on the (2, 2, 2) mesh against one device with
    `embed.lookup` replaced by the plain take (today's lookup before the fix)."""
    cfg = ModelConfig.preset("tiny").replace(vocab_size=256, n_layers=1)
    params = model_lib.init_params(cfg, jax.random.key(0))
    rs = np.random.RandomState(1)
    tokens = jnp.asarray(rs.randint(0, cfg.vocab_size, (4, 16)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (4, 16))
    seg = jnp.ones((4, 16), jnp.int32)

    def grads(mesh):
        def g(p, tok, ps, sg):
            with sharding.with_rules(mesh):
                return jax.grad(lambda q: ts.summed_loss(q, tok, ps, sg, cfg=cfg)[0])(p)["tok_embeddings"]
        p = jax.device_put(params, model_lib.param_shardings(cfg, mesh, jnp.float32))
        bsh = sharding.batch_sharding(mesh)
        return np.asarray(jax.jit(g)(p, *(jax.device_put(x, bsh) for x in (tokens, pos, seg))))

    sharded = grads(_mesh(2, 2, 2))
    monkeypatch.setattr(embed, "lookup", lambda e, t, dt: jnp.take(e, t, axis=0).astype(dt))
    ref = grads(_mesh(1, 1, 1))
    np.testing.assert_allclose(sharded, ref, rtol=1e-5, atol=2e-6)


# ----- the compile: the partitioner's warning goes to stderr from C++, so it is read from a subprocess -----

_COMPILE = r"""
import sys
import jax, jax.numpy as jnp
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P
from mistral_jax.training import optim; from mistral_jax.model import sharding
from mistral_jax.training import train_step as ts
from mistral_jax.model.config import ModelConfig
from mistral_jax.training.run_config import OptimSection

def say(text):
    print(text, file=sys.stderr, flush=True)

# control: the plain take under the same rules warns, so this process does show the partitioner's warnings
mesh = sharding.make_mesh(2, 2, 2)
def f(t, tok):
    with sharding.with_rules(mesh):
        h = nn.with_logical_constraint(jnp.take(t, tok, axis=0), ("batch", "length", "act_embed"))
        return jnp.sum(h)
tsh = NamedSharding(mesh, P("tensor", "fsdp"))
jax.jit(jax.grad(f), out_shardings=tsh).lower(
    jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=tsh),
    jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=sharding.batch_sharding(mesh))).compile()
say("=== control done")

cfg = ModelConfig.preset("tiny").replace(n_layers=1, vocab_size=256)
o = OptimSection(grad_accum=1)
opt = optim.make_optimizer(o, 10)
for shape in ((2, 2, 2), (2, 4, 1)):
    mesh = sharding.make_mesh(*shape)
    state = ts.abstract_state(cfg, opt, mesh)
    bsh = ts.batch_shardings(mesh)
    batch = {k: jax.ShapeDtypeStruct((1, 8, 32), jnp.int32, sharding=bsh[k]) for k in ts.BATCH_KEYS}
    step = ts.make_train_step(cfg, opt, optim.learning_rate_schedule(o, 10), mesh, dtype=jnp.bfloat16,
                              remat="full")
    step.lower(state, batch).compile()
    say(f"=== step {shape} compiled")
"""


@pytest.mark.slow
def test_sharded_step_compiles_without_full_rematerialization():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_CPP_MAX_VLOG_LEVEL")}
    env.update(XLA_FLAGS=xla_flags(8, as_shipped=True), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _COMPILE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    err = proc.stderr
    control, _, steps = err.partition("=== control done")
    assert WARNING in control, "the control compile did not warn: XLA's warnings are not reaching stderr"
    assert "=== step (2, 2, 2) compiled" in steps and "=== step (2, 4, 1) compiled" in steps, err[-4000:]
    bad = [line for line in steps.splitlines() if WARNING in line]
    assert not bad, "\n".join(line[:600] for line in bad)

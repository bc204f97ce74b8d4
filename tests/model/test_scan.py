"""Scanned layers (nn.scan over the blocks) against the per-layer Python loop: logits, gradients, remat
policies, the stacked KV cache, per-layer init randomness and option pass-through."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.model import cache as kv_cache
from mistral_jax.model import transformer as model
from mistral_jax.training import train_step as ts
from mistral_jax.model.config import ModelConfig
from tests.model.trees import param_logical_specs, stack_layers

CFG = ModelConfig.preset("tiny").replace(n_layers=3, vocab_size=256, sliding_window=8)
TOL = 1e-5


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
    rs = np.random.RandomState(0)
    tokens = jnp.asarray(rs.randint(0, CFG.vocab_size, (2, 24)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 14 + [2] * 10], 2, axis=0), jnp.int32)   # two packed documents
    pos = jnp.asarray(np.repeat([list(range(14)) + list(range(10))], 2, axis=0), jnp.int32)
    return tokens, pos, seg


@functools.partial(jax.jit, static_argnames=("scan_layers", "remat"))
def _logits(params, tokens, pos, seg, scan_layers: bool = True, remat: str = "none"):
    return model.Transformer(CFG, remat=remat, scan_layers=scan_layers).apply({"params": params}, tokens, pos, seg)[0]


def _loss_and_grads(params, batch, scan_layers: bool, remat: str):
    tokens, pos, seg = batch
    fn = jax.jit(jax.value_and_grad(lambda p: ts.summed_loss(p, tokens, pos, seg, cfg=CFG, remat=remat,
                                                             scan_layers=scan_layers)[0]))
    return fn(params)


def test_params_are_stacked_with_a_layers_axis(params):
    wq = params["layers"]["attention"]["wq"]
    assert wq.shape == (CFG.n_layers, CFG.dim, CFG.n_heads, CFG.head_dim)
    assert not any(k.startswith("layers_") for k in params)
    # split_rngs: every layer gets its own random init
    assert not np.array_equal(np.asarray(wq[0]), np.asarray(wq[1]))
    specs = param_logical_specs(CFG)
    assert specs["layers"]["feed_forward"]["w1"] == jax.sharding.PartitionSpec("layers", "embed", "mlp")
    assert model.count_params(CFG) == sum(x.size for x in jax.tree_util.tree_leaves(params))
    # unstack_layers gives exactly the unscanned model's tree
    def shapes(tree):
        return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    unscanned = nn.unbox(model.abstract_params(CFG, scan_layers=False))
    assert shapes(model.unstack_layers(params, CFG.n_layers)) == shapes(unscanned)
    assert "['layers_2']['attention']['wq']" in shapes(unscanned)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scanned_equals_unscanned_logits_and_grads(params, batch, remat):
    tokens, pos, seg = batch
    per_layer = model.unstack_layers(params, CFG.n_layers)
    scanned = _logits(params, tokens, pos, seg, remat=remat)
    loop = _logits(per_layer, tokens, pos, seg, scan_layers=False, remat=remat)
    assert np.abs(np.asarray(scanned) - np.asarray(loop)).max() <= TOL

    loss_s, g_s = _loss_and_grads(params, batch, True, remat)
    loss_u, g_u = _loss_and_grads(per_layer, batch, False, remat)
    assert abs(float(loss_s) - float(loss_u)) <= TOL * abs(float(loss_u))
    g_u = stack_layers(g_u, CFG.n_layers)
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), g_s, g_u)
    assert max(jax.tree_util.tree_leaves(diffs)) <= TOL, diffs
    assert float(jnp.abs(g_s["layers"]["attention"]["wq"]).max()) > 1e-3   # gradients reach every block


def test_remat_policy_is_applied(params):
    """The chosen policy shows in the traced gradient: a remat call carrying that policy (none without)."""
    tokens = jnp.zeros((1, 8), jnp.int32)

    def policies(remat):
        f = lambda q: model.Transformer(CFG, remat=remat).apply({"params": q}, tokens)[0].sum()  # noqa: E731
        return {re.sub(r" at 0x[0-9a-f]+", "", m)
                for m in re.findall(r"policy=([^\n\]]*)", str(jax.make_jaxpr(jax.grad(f))(params)))}
    assert policies("none") == set()
    assert policies("full") == {"None"}     # no residuals saved: everything recomputed
    # the dots-without-batch-dims policy: jax 0.10.2 prints it as a DotsSaveable, earlier ones as the function
    assert len(dots := policies("dots")) == 1 and next(iter(dots)) in (
        "DotsSaveable(only_if_no_batch_dims=True)", "<function dots_with_no_batch_dims_saveable>")
    with pytest.raises(ValueError, match="remat must be one of.*'some'"):
        model.Transformer(CFG, remat="some").apply({"params": params}, tokens)


def test_stacked_cache_scanned_equals_unscanned(params):
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, CFG.vocab_size, (2, 12)), jnp.int32)
    cache = kv_cache.init_cache(CFG, 2, CFG.sliding_window)
    assert cache["k"].shape == (CFG.n_layers, 2, CFG.sliding_window, CFG.n_kv_heads, CFG.head_dim)
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    @functools.partial(jax.jit, static_argnums=0)
    def cached(scan_layers, params, cache):
        return model.Transformer(CFG, scan_layers=scan_layers).apply({"params": params}, tokens, pos, cache=cache)

    a, ca = cached(True, params, cache)
    b, cb = cached(False, model.unstack_layers(params, CFG.n_layers), cache)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= TOL
    for k in ("k", "v", "pos"):
        assert ca[k].shape == cache[k].shape
        assert np.abs(np.asarray(ca[k]) - np.asarray(cb[k])).max() <= TOL
    assert np.asarray(ca["pos"])[:, 0].tolist() == [[8, 9, 10, 11, 4, 5, 6, 7]] * CFG.n_layers   # slot p mod 8
    # each layer wrote its own keys
    assert not np.allclose(np.asarray(ca["k"][0]), np.asarray(ca["k"][1]))
    with pytest.raises(ValueError, match="cache has 2 layers, model has 3"):
        model.Transformer(CFG).apply({"params": params}, tokens, pos,
                                     cache=kv_cache.init_cache(CFG.replace(n_layers=2), 2, 8))


@pytest.mark.slow
def test_attention_options_pass_through_the_scan(params, batch):
    tokens, pos, seg = batch
    def logits(module, params):
        return module.apply({"params": params}, tokens, pos, seg)[0]
    logits = jax.jit(logits, static_argnums=0)
    dense = logits(model.Transformer(CFG), params)
    block = logits(model.Transformer(CFG, attn_impl="blockwise", attn_block=8), params)
    assert np.abs(np.asarray(dense) - np.asarray(block)).max() <= TOL
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        model.Transformer(CFG, attn_impl="nope").apply({"params": params}, tokens, pos, seg)
    h, _ = model.Transformer(CFG).apply({"params": params}, tokens, pos, seg, return_hidden=True)
    assert h.shape == (*tokens.shape, CFG.dim)

"""LoRA adapters: config checks, the adapter tree and its shardings, exact step-0 equality with the base
model, adapter-only training, merged export (logits, native save/load, cached decoding) and the optimizer
state of LoRA vs full fine-tuning on a 7B-shaped model."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mistral_jax.model import cache as kv_cache
from mistral_jax.checkpoint import native as checkpoint
from mistral_jax.model import lora
from mistral_jax.model import transformer as model
from mistral_jax.model import sharding
from mistral_jax.model.config import ModelConfig
from tests.inference.decode_helpers import forward_cached
from tests.model.trees import param_logical_specs, stack_layers

CFG = ModelConfig.preset("tiny").replace(vocab_size=256, sliding_window=8)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
T = 20
STEPS = 5


def _leaves(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def initialised():
    """The model's own init with adapters (B = 0)."""
    return model.init_params(CFG, jax.random.key(0), lora=LCFG)


@pytest.fixture(scope="module")
def base(initialised):
    return lora.split(initialised)[1]


@pytest.fixture(scope="module")
def adapted(base):
    return lora.add_adapters(base, CFG, LCFG, jax.random.key(1))


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (2, T)), jnp.int32)


def _train(params, tokens, steps=STEPS):
    """Adam on the adapters only (base frozen via split/join), scanned model with remat="full".

    Returns (params, losses, (params, adapter grads) of the last step)."""
    opt = optax.adam(1e-2)
    adapters, frozen = lora.split(params)

    def loss_fn(a, frozen):
        logits, _ = model.Transformer(CFG, lora=LCFG, remat="full").apply({"params": lora.join(a, frozen)}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    @jax.jit
    def step(a, s, frozen):
        loss, g = jax.value_and_grad(loss_fn)(a, frozen)
        u, s = opt.update(g, s, a)
        return optax.apply_updates(a, u), s, loss, g

    state = opt.init(adapters)
    losses = []
    for _ in range(steps):
        last = adapters
        adapters, state, loss, grads = step(adapters, state, frozen)
        losses.append(float(loss))
    return lora.join(adapters, frozen), losses, (lora.join(last, frozen), grads)


@pytest.fixture(scope="module")
def trained(adapted, tokens):
    return _train(adapted, tokens)


# ----- config -----

@pytest.mark.parametrize("kw, match", [
    (dict(rank=0), "field 'rank' must be an integer >= 1, got 0"),
    (dict(rank=True), "field 'rank' must be an integer >= 1, got True"),
    (dict(rank=4.0), "field 'rank' must be an integer >= 1, got 4.0"),
    (dict(rank=4, alpha=0), "field 'alpha' must be a finite number > 0, got 0"),
    (dict(rank=4, alpha=float("nan")), "field 'alpha' must be a finite number > 0, got nan"),
    (dict(rank=4, targets="wq"), "field 'targets' must be a tuple of names .* got 'wq'"),
    (dict(rank=4, targets=("wq", "w4")), r"field 'targets' .* got \('wq', 'w4'\) \(unknown: \['w4'\]\)"),
    (dict(rank=4, targets=("wq", "wq")), r"without repeats, got \('wq', 'wq'\)"),
    (dict(rank=4, targets=()), r"non-empty subset .* got \(\)"),
])
def test_config_errors_name_the_field_and_value(kw, match):
    with pytest.raises(ValueError, match=match):
        lora.LoraConfig(**kw)


def test_config_is_hashable_with_tuple_targets():
    a = lora.LoraConfig(rank=8, alpha=16, targets=["wq", "wv"])
    assert a.targets == ("wq", "wv") and a.scale == 2.0
    assert hash(a) == hash(lora.LoraConfig(rank=8, alpha=16, targets=("wq", "wv")))
    assert lora.LoraConfig(rank=8).targets == lora.TARGETS


# ----- the adapter tree -----

def test_adapter_tree_names_shapes_and_logical_axes(base, adapted):
    adapters, rest = lora.split(adapted)
    assert _leaves(rest).keys() == _leaves(base).keys()
    assert all(rest_leaf is _leaves(base)[k] for k, rest_leaf in _leaves(rest).items())   # shared, not copied
    # same tree as the model creates with lora=LCFG
    abstract = nn.unbox(model.abstract_params(CFG, lora=LCFG))
    assert {k: (v.shape, v.dtype) for k, v in _leaves(abstract).items()} == \
           {k: (v.shape, v.dtype) for k, v in _leaves(adapted).items()}
    L, D, N, K, H, F, r = CFG.n_layers, CFG.dim, CFG.n_heads, CFG.n_kv_heads, CFG.head_dim, CFG.hidden_dim, 4
    att, ff = adapters["layers"]["attention"], adapters["layers"]["feed_forward"]
    assert att["wq_lora_a"].shape == (L, D, r) and att["wq_lora_b"].shape == (L, r, N, H)
    assert att["wk_lora_b"].shape == (L, r, K, H) and att["wo_lora_a"].shape == (L, N, H, r)
    assert ff["w2_lora_a"].shape == (L, F, r) and ff["w2_lora_b"].shape == (L, r, D)
    assert not any(np.asarray(b).any() for k, b in _leaves(adapters).items() if k.endswith("_lora_b']"))
    a = np.asarray(att["wq_lora_a"])
    assert np.abs(a).max() <= 1 / math.sqrt(D) and a.std() > 0.5 / math.sqrt(3 * D)   # uniform +-1/sqrt(fan_in)
    assert not np.array_equal(a[0], a[1])                                              # per-layer draws
    specs = param_logical_specs(CFG, lora=LCFG)["layers"]
    assert specs["attention"]["wq_lora_a"] == P("layers", "embed", None)
    assert specs["attention"]["wq_lora_b"] == P("layers", None, "q_heads", "head_dim")
    assert specs["attention"]["wo_lora_a"] == P("layers", "q_heads", "head_dim", None)
    assert specs["feed_forward"]["w2_lora_b"] == P("layers", None, "embed")
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sh = model.param_shardings(CFG, mesh, lora=LCFG)
    assert sh["layers"]["feed_forward"]["w1_lora_a"].spec == P(None, "fsdp", None)
    assert sh["layers"]["feed_forward"]["w1_lora_b"].spec == P(None, None, "tensor")
    placed = jax.device_put(adapted, sh)                                 # the tree matches its shardings
    assert placed["layers"]["attention"]["wo_lora_b"].sharding == sh["layers"]["attention"]["wo_lora_b"]


def test_split_join_and_adapter_paths(adapted):
    adapters, rest = lora.split(adapted)
    assert jax.tree_util.tree_structure(lora.join(adapters, rest)) == jax.tree_util.tree_structure(adapted)
    assert all(x is y for x, y in zip(jax.tree_util.tree_leaves(lora.join(adapters, rest)),
                                      jax.tree_util.tree_leaves(adapted)))
    assert lora.is_adapter_path(("layers", "attention", "wq_lora_a"))
    assert lora.is_adapter_path(("layers_1", "feed_forward", "w2_lora_b"))
    assert not lora.is_adapter_path(("layers", "attention", "wq"))
    assert not lora.is_adapter_path(("output",)) and not lora.is_adapter_path(())
    # any params-shaped tree splits the same way (here: the logical specs)
    spec_adapters, _ = lora.split(param_logical_specs(CFG, lora=LCFG))
    assert jax.tree_util.tree_structure(spec_adapters, is_leaf=lambda x: isinstance(x, P)) == \
           jax.tree_util.tree_structure(adapters)
    with pytest.raises(ValueError, match="'layers/attention/wq' is in both"):
        lora.join({"layers": {"attention": {"wq": 0}}}, adapted)


def test_add_adapters_refuses_bad_input(base, adapted):
    with pytest.raises(ValueError, match="already hold LoRA adapters .*'layers/attention/w"):
        lora.add_adapters(adapted, CFG, LCFG, jax.random.key(2))
    with pytest.raises(ValueError, match=r"'layers/feed_forward/w1' has shape \(2, 64, 128\), the model config "
                                         r"wants \(2, 64, 96\)"):
        lora.add_adapters(base, CFG.replace(hidden_dim=96), LCFG, jax.random.key(2))


# ----- numerics -----

@functools.partial(jax.jit, static_argnames=("scan_layers", "lcfg"))
def _logits(params, tokens, scan_layers, lcfg):
    return model.Transformer(CFG, scan_layers=scan_layers, lora=lcfg).apply({"params": params}, tokens)[0]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_fresh_adapters_give_the_base_logits_bit_for_bit(initialised, base, adapted, tokens, scan_layers):
    b, a = base, adapted
    if not scan_layers:
        b, a = model.unstack_layers(base, CFG.n_layers), model.unstack_layers(adapted, CFG.n_layers)
    ref = _logits(b, tokens, scan_layers, None)
    out = _logits(a, tokens, scan_layers, LCFG)
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    if scan_layers:   # the model's own init (B = 0) too
        assert np.array_equal(np.asarray(_logits(initialised, tokens, True, LCFG)), np.asarray(ref))


def test_training_changes_only_the_adapters(adapted, trained, tokens):
    params, losses, _ = trained
    assert losses[-1] < losses[0] - 0.01, losses
    before, after = _leaves(adapted), _leaves(params)
    assert before.keys() == after.keys()
    for k in after:
        changed = not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))
        assert changed == ("_lora_" in k), k          # every adapter moved, every base weight bit-identical
    logits0 = model.forward(adapted, tokens, CFG, lora=LCFG)
    logits1 = model.forward(params, tokens, CFG, lora=LCFG)
    assert np.abs(np.asarray(logits1) - np.asarray(logits0)).max() > 1e-3


def test_adapter_grads_scanned_remat_equal_unscanned(trained, tokens):
    """The adapter gradients of the training step (scanned, remat="full") equal the per-layer loop's
    without remat."""
    params, grads = trained[2]

    def loss(a, frozen):
        logits, _ = model.Transformer(CFG, lora=LCFG, scan_layers=False).apply(
            {"params": lora.join(a, frozen)}, tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    adapters, frozen = lora.split(model.unstack_layers(params, CFG.n_layers))
    g_loop = stack_layers(jax.jit(jax.grad(loss))(adapters, frozen), CFG.n_layers)
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), grads, g_loop)
    assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-6, diffs
    assert min(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)) > 1e-5   # all adapters learn


@pytest.fixture(scope="module")
def merged(trained):
    return lora.merge(trained[0], LCFG)


def test_merged_export_matches_the_adapter_model(base, trained, merged, tokens, tmp_path):
    params = trained[0]
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)   # a plain model tree
    want = np.asarray(model.forward(params, tokens, CFG, lora=LCFG))
    got = np.asarray(model.forward(merged, tokens, CFG))
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(np.asarray(model.forward(base, tokens, CFG)) - want).max() > 1e-3      # the merge did something
    # per-layer trees merge the same way
    per_layer = lora.merge(model.unstack_layers(params, CFG.n_layers), LCFG)
    for k, x in _leaves(stack_layers(per_layer, CFG.n_layers)).items():
        np.testing.assert_allclose(np.asarray(x), np.asarray(_leaves(merged)[k]), rtol=0, atol=1e-7)
    # an ordinary native checkpoint
    checkpoint.save_params(tmp_path / "export", CFG, merged)
    cfg2, loaded = checkpoint.load_params(tmp_path / "export")
    assert cfg2 == CFG
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(merged)))


def test_merge_casts_to_the_weight_dtype(trained):
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), trained[0])
    m = lora.merge(bf16, LCFG)
    assert {x.dtype for x in jax.tree_util.tree_leaves(m)} == {jnp.dtype(jnp.bfloat16)}
    w = trained[0]["layers"]["attention"]["wo"]
    a, b = (trained[0]["layers"]["attention"][k].astype(jnp.bfloat16).astype(jnp.float32)
            for k in ("wo_lora_a", "wo_lora_b"))
    ref = (w.astype(jnp.bfloat16).astype(jnp.float32)
           + LCFG.scale * jnp.einsum("lnhr,lrd->lnhd", a, b, precision="highest")).astype(jnp.bfloat16)
    assert np.array_equal(np.asarray(m["layers"]["attention"]["wo"]), np.asarray(ref))


def test_merge_refuses_a_mismatched_config(trained):
    with pytest.raises(ValueError, match=r"'layers/attention/wk' has adapters but is not in the config's targets"):
        lora.merge(trained[0], lora.LoraConfig(rank=4, alpha=8.0, targets=("wq",)))
    with pytest.raises(ValueError, match=r"'layers/attention/wq_lora_a' has rank 4, the config's rank is 8"):
        lora.merge(trained[0], lora.LoraConfig(rank=8))
    with pytest.raises(ValueError, match=r"'layers/attention/wq' is a LoRA target of the config but has no adapters"):
        lora.merge(lora.split(trained[0])[1], LCFG)


def test_cached_decoding_with_adapters_and_merged(trained, merged, tokens):
    """The LoRA model through the KV cache (chunks of 3) and `forward_cached` on the merged params
    (what generation uses) both equal the adapter model's full forward."""
    params = trained[0]
    want = np.asarray(model.forward(params, tokens, CFG, lora=LCFG))
    chunk, B = 4, tokens.shape[0]

    @jax.jit
    def run_chunk(p, tok, pos, cache):
        with sharding.with_rules():
            return model.Transformer(CFG, lora=LCFG).apply({"params": p}, tok, pos, cache=cache)

    cache = kv_cache.init_cache(CFG, B, kv_cache.cache_size(CFG, T))
    outs = []
    for i in range(0, T, chunk):
        pos = jnp.broadcast_to(jnp.arange(i, i + chunk, dtype=jnp.int32), (B, chunk))
        logits, cache = run_chunk(params, tokens[:, i:i + chunk], pos, cache)
        outs.append(np.asarray(logits))
    assert np.abs(np.concatenate(outs, axis=1) - want).max() <= 1e-5
    got = np.asarray(forward_cached(merged, tokens, cfg=CFG, chunk=3))
    assert np.abs(got - want).max() <= 1e-5


# ----- optimizer state: LoRA vs full fine-tuning on a 7B-shaped model -----

def test_optimizer_state_bytes_lora_vs_full_7b():
    cfg = ModelConfig.preset("mistral-7b-v0.1")
    lcfg = lora.LoraConfig(rank=16, alpha=32.0)
    opt = optax.adam(1e-4)
    abstract = nn.unbox(model.abstract_params(cfg, lora=lcfg))     # shapes only: nothing is allocated
    adapters, base = lora.split(abstract)
    full = lora.count_bytes(jax.eval_shape(opt.init, base))
    lora_bytes = lora.count_bytes(jax.eval_shape(opt.init, adapters))
    n_base = sum(x.size for x in jax.tree_util.tree_leaves(base))
    n_adapters = sum(x.size for x in jax.tree_util.tree_leaves(adapters))
    D, NH, KH, F, r = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim, 16
    per_layer = r * ((D + NH) * 2 + (D + KH) * 2 + (D + F) * 3)     # wq, wo; wk, wv; w1, w2, w3
    assert n_base == 7_241_732_096 and n_adapters == cfg.n_layers * per_layer == 41_943_040
    assert full == 8 * n_base + 4 and lora_bytes == 8 * n_adapters + 4      # adam mu + nu (float32) + count
    print(f"\n7B adam state: full {full / 2**30:.2f} GiB, LoRA r=16 all targets {lora_bytes / 2**20:.1f} MiB "
          f"({lora_bytes / full:.4%}); {n_adapters:,} adapter params")

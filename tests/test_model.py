"""Model core: HF parity, sliding-window boundary, sharding, bf16, config and weight errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax import model, sharding, weights
from mistral_jax.attention import attention_mask
from mistral_jax.config import ConfigError, ModelConfig

# Max |bf16-compute logits - f32 logits| relative to max |f32 logits| (measured 0.0055; documented in README).
BF16_REL_TOL = 0.02


def _load(ref):
    cfg = ModelConfig.from_hf_config(ref.path / "config.json")
    return cfg, weights.state_dict_to_params(ref.state_dict(), cfg, "hf")


@pytest.fixture(scope="module")
def gqa(hf_gqa):
    return (hf_gqa, *_load(hf_gqa))


@pytest.mark.parametrize("fixture", ["hf_gqa", "hf_mha"])
def test_logit_parity_with_hf_batch_longer_than_window(fixture, request):
    ref = request.getfixturevalue(fixture)
    cfg, params = _load(ref)
    assert cfg.sliding_window == 16
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (3, 64))
    ours = np.asarray(model.forward(params, jnp.asarray(tokens), cfg))
    theirs = ref.logits(tokens)
    assert ours.shape == theirs.shape == (3, 64, cfg.vocab_size)
    assert np.abs(ours - theirs).max() <= 1e-4


def test_logit_parity_with_hf_long_sequence(gqa):
    ref, cfg, params = gqa
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 544))
    diff = np.abs(np.asarray(model.forward(params, jnp.asarray(tokens), cfg)) - ref.logits(tokens)).max()
    assert diff <= 1e-4


def test_window_mask_boundary():
    W = 4
    pos = jnp.arange(12)[None]
    m = np.asarray(attention_mask(pos, pos, W))[0]
    p = 9
    assert m[p, p] and m[p, p - W + 1]          # itself and the oldest key in the window
    assert not m[p, p - W]                       # the boundary key: W positions back, masked
    assert not m[p, p + 1]                       # causal
    assert m.sum(axis=1).tolist() == [min(i + 1, W) for i in range(12)]
    # empty slots (-1) are never seen; segments do not cross
    k = jnp.array([[-1, 0, 1, 2]])
    assert not np.asarray(attention_mask(jnp.array([[2]]), k, None))[0, 0, 0]
    seg = jnp.array([[1, 1, 2, 2]])
    ms = np.asarray(attention_mask(pos[:, :4], pos[:, :4], None, seg, seg))[0]
    assert not ms[2, 1] and ms[3, 2] and ms[1, 0]


def test_boundary_key_does_not_reach_query_in_one_layer(gqa):
    """In a one-layer model, the token W back cannot change the logits at p; the token W-1 back does."""
    _, cfg, params = gqa
    cfg1 = cfg.replace(n_layers=1)
    p1 = {k: v for k, v in params.items() if k in ("tok_embeddings", "layers_0", "norm", "output")}
    W, p = cfg.sliding_window, 40
    base = np.random.RandomState(2).randint(0, cfg.vocab_size, (1, 48))
    def logits_at_p(t):
        return np.asarray(model.forward(p1, jnp.asarray(t), cfg1))[0, p]
    ref = logits_at_p(base)
    at_boundary, inside = base.copy(), base.copy()
    at_boundary[0, p - W] = (base[0, p - W] + 7) % cfg.vocab_size
    inside[0, p - W + 1] = (base[0, p - W + 1] + 7) % cfg.vocab_size
    assert np.array_equal(logits_at_p(at_boundary), ref)
    assert np.abs(logits_at_p(inside) - ref).max() > 1e-4


def test_sharded_forward_equals_single_device(gqa):
    ref, cfg, params = gqa
    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = model.param_shardings(cfg, mesh)
    sharded = jax.device_put(params, shardings)
    wq = sharded["layers_0"]["attention"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert len({str(s.index) for s in wq.addressable_shards}) == 4   # really split, not replicated
    assert wq.addressable_shards[0].data.shape == (cfg.dim // 2, cfg.n_heads // 2, cfg.head_dim)
    tokens = np.random.RandomState(3).randint(0, cfg.vocab_size, (4, 40))
    tok_sharded = jax.device_put(jnp.asarray(tokens), sharding.batch_sharding(mesh))
    out = model.forward(sharded, tok_sharded, cfg)
    single = model.forward(params, jnp.asarray(tokens), cfg)
    assert np.abs(np.asarray(out) - np.asarray(single)).max() <= 1e-5
    assert not out.sharding.is_fully_replicated


def test_sharded_init_places_params_directly():
    cfg = ModelConfig.preset("tiny")
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    params = model.init_params(cfg, jax.random.key(0), mesh)
    expected = model.param_shardings(cfg, mesh)
    for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected)):
        assert got.sharding == want
    emb = params["tok_embeddings"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (cfg.vocab_size // 2, cfg.dim // 2)


def test_bfloat16_compute_close_to_float32(gqa):
    ref, cfg, params = gqa
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 48)))
    f32 = np.asarray(model.forward(params, tokens, cfg))
    bf16 = model.forward(params, tokens, cfg, jnp.bfloat16)
    assert bf16.dtype == jnp.float32   # logits come out in float32
    rel = np.abs(np.asarray(bf16) - f32).max() / np.abs(f32).max()
    assert rel <= BF16_REL_TOL, rel
    assert rel > 0   # really computed in bf16


def test_7b_parameter_counts():
    assert model.count_params(ModelConfig.preset("mistral-7b-v0.1")) == 7_241_732_096
    assert model.count_params(ModelConfig.preset("mistral-7b-v0.3")) == 7_248_023_552
    v2 = ModelConfig.preset("mistral-7b-v0.2")
    assert v2.sliding_window is None and v2.rope_theta == 1e6


@pytest.mark.parametrize("kw, field", [
    (dict(n_heads=6, n_kv_heads=4), "n_kv_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(dim=0), "dim"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(norm_eps=-1.0), "norm_eps"),
])
def test_bad_config_names_field(kw, field):
    base = ModelConfig.preset("tiny").to_dict()
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**base, **kw})


def test_bad_foreign_configs_name_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown model config field.*'n_expert'"):
        ModelConfig.from_dict({**ModelConfig.preset("tiny").to_dict(), "n_expert": 8})
    with pytest.raises(ConfigError, match="num_attention_heads.*does not divide .hidden_size"):
        ModelConfig.from_hf_config({"hidden_size": 100, "num_hidden_layers": 2, "num_attention_heads": 3,
                                    "intermediate_size": 64, "vocab_size": 10})
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig.from_params_json({"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 3, "head_dim": 16,
                                      "hidden_dim": 32, "vocab_size": 10, "rope_theta": 1e4})
    with pytest.raises(ConfigError, match="sliding_window"):
        ModelConfig.from_params_json({"dim": 64, "n_layers": 1, "n_heads": 4, "head_dim": 16, "hidden_dim": 32,
                                      "vocab_size": 10, "sliding_window": "lots", "rope_theta": 1e4})
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        ModelConfig.preset("nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.from_hf_config(tmp_path / "config.json")


def test_params_json_theta_rule():
    base = {"dim": 64, "n_layers": 1, "n_heads": 4, "head_dim": 16, "hidden_dim": 32, "vocab_size": 10}
    cfg, notes = ModelConfig.from_params_json({**base, "sliding_window": "4096"})
    assert cfg.rope_theta == 1e4 and cfg.sliding_window == 4096 and "inferred 10000" in notes[0]
    with pytest.raises(ConfigError, match="rope_theta"):
        ModelConfig.from_params_json(base)
    cfg, _ = ModelConfig.from_params_json(base, rope_theta=1e6)
    assert cfg.rope_theta == 1e6


def test_mismatched_weights_name_tensor(gqa):
    ref, cfg, _ = gqa
    sd = ref.state_dict()
    bad = dict(sd)
    bad["model.layers.1.self_attn.k_proj.weight"] = np.zeros((3, cfg.dim), np.float32)
    with pytest.raises(weights.WeightError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(3, 64\)"):
        weights.state_dict_to_params(bad, cfg, "hf")
    missing = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    with pytest.raises(weights.WeightError, match="missing.*lm_head.weight"):
        weights.state_dict_to_params(missing, cfg, "hf")
    with pytest.raises(weights.WeightError, match="unexpected.*model.layers.1"):
        weights.state_dict_to_params(sd, cfg.replace(n_layers=1), "hf")


def test_mistral_layout_row_reorder_round_trips(gqa):
    ref, cfg, params = gqa
    sd_m = dict(weights.params_to_state_dict(params, cfg, "mistral"))
    assert "layers.0.attention.wq.weight" in sd_m
    hf_q = ref.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(weights.interleaved_to_half(sd_m["layers.0.attention.wq.weight"], cfg.n_heads), hf_q)
    back = weights.state_dict_to_params(sd_m, cfg, "mistral")
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        assert np.array_equal(a, b)

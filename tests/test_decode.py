"""Rolling-buffer cache, chunked prefill and the jitted batch decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax import cache as kv_cache
from mistral_jax import decode, model, sharding, weights
from mistral_jax.config import ModelConfig
from tests import hf_ref

W = 8


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    # A larger init std than HF's default keeps greedy outputs from collapsing into one repeated token.
    r = hf_ref.make_hf_model(tmp_path_factory.mktemp("hf_w8"), n_heads=4, n_kv_heads=2, window=W, vocab=128,
                             seed=3, init_std=0.15)
    cfg = ModelConfig.from_hf_config(r.path / "config.json")
    return r, cfg, weights.state_dict_to_params(r.state_dict(), cfg, "hf")


@pytest.fixture(scope="module")
def seq(ref):
    _, cfg, _ = ref
    return jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 5 * W + 3)))


@pytest.fixture(scope="module")
def full_logits(ref, seq):
    _, cfg, params = ref
    return np.asarray(model.forward(params, seq, cfg))


def test_step_by_step_cached_decode_equals_full_forward(ref, seq, full_logits):
    _, cfg, params = ref
    assert seq.shape[1] > 4 * W          # several wrap-arounds of the W-slot buffer
    stepwise = np.asarray(decode.forward_cached(params, seq, cfg=cfg, chunk=1))
    assert np.abs(stepwise - full_logits).max() <= 1e-5


@pytest.mark.parametrize("chunk", [3, W, 2 * W + 5, 5 * W + 3])
def test_chunked_prefill_equals_one_shot(ref, seq, full_logits, chunk):
    _, cfg, params = ref
    out = np.asarray(decode.forward_cached(params, seq, cfg=cfg, chunk=chunk))
    assert np.abs(out - full_logits).max() <= 1e-5


def test_cache_write_keeps_last_slots_and_positions():
    cfg = ModelConfig.preset("tiny").replace(sliding_window=4, n_layers=1)
    c = kv_cache.init_cache(cfg, 2, 4)[0]
    pos = jnp.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, -1, -1, -1]])
    k = jnp.broadcast_to(pos[:, :, None, None].astype(jnp.float32), (2, 6, cfg.n_kv_heads, cfg.head_dim))
    c = kv_cache.write(c, k, k, pos)
    assert c["pos"].tolist() == [[4, 5, 2, 3], [0, 1, 2, -1]]       # slot p mod 4; padding not written
    assert c["k"][0, :, 0, 0].tolist() == [4.0, 5.0, 2.0, 3.0]


def test_batch_of_different_lengths_equals_each_alone(ref):
    _, cfg, params = ref
    rs = np.random.RandomState(5)
    prompts = [rs.randint(3, cfg.vocab_size, n).tolist() for n in (3, 2 * W + 1, W)]
    batched = decode.generate(params, cfg, prompts, 2 * W, eos_id=-1)
    alone = [decode.generate(params, cfg, [p], 2 * W, eos_id=-1)[0] for p in prompts]
    assert batched == alone
    assert all(len(b) == 2 * W for b in batched)
    assert len({tuple(b) for b in batched}) == 3


def test_greedy_matches_hf_generate_past_the_window(ref):
    import torch
    r, cfg, params = ref
    prompt = np.random.RandomState(6).randint(3, cfg.vocab_size, W + 3).tolist()
    n = 3 * W
    with torch.no_grad():
        hf = r.model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=-1,
                              pad_token_id=0)[0, len(prompt):].tolist()
    ours = decode.generate(params, cfg, [prompt], n, eos_id=-1)[0]
    assert len(prompt) + n > 4 * W
    assert ours == hf
    assert len(set(ours)) > 3


def test_cache_memory_flat_in_generated_length(ref):
    _, cfg, params = ref
    short = decode.generate(params, cfg, [[1, 5, 6]], 4 * W, eos_id=-1, return_info=True)
    long = decode.generate(params, cfg, [[1, 5, 6]], 32 * W, eos_id=-1, return_info=True)
    assert len(long.tokens[0]) == 32 * W
    assert short.cache_bytes == long.cache_bytes == kv_cache.cache_bytes(kv_cache.init_cache(cfg, 1, W))
    no_window = cfg.replace(sliding_window=None)
    assert kv_cache.cache_size(no_window, 32 * W) == 32 * W and kv_cache.cache_size(cfg, 32 * W) == W


def test_eos_stops_a_row_and_sampling_settings(ref):
    _, cfg, params = ref
    prompts = [[1, 7, 9, 11], [1, 30]]
    greedy = decode.generate(params, cfg, prompts, 12, eos_id=-1)
    eos = greedy[0][4]
    stopped = decode.generate(params, cfg, prompts, 12, eos_id=eos, return_info=True)
    assert stopped.tokens[0] == greedy[0][:greedy[0].index(eos)] and stopped.stopped_on_eos[0]
    # top_k=1 and a tiny top_p are greedy whatever the temperature; the seed makes sampling reproducible
    assert decode.generate(params, cfg, prompts, 12, eos_id=-1, temperature=1.5, top_k=1, seed=3) == greedy
    assert decode.generate(params, cfg, prompts, 12, eos_id=-1, temperature=1.5, top_p=1e-6, seed=3) == greedy
    a = decode.generate(params, cfg, prompts, 12, eos_id=-1, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = decode.generate(params, cfg, prompts, 12, eos_id=-1, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    c = decode.generate(params, cfg, prompts, 12, eos_id=-1, temperature=1.0, top_k=50, top_p=0.9, seed=8)
    assert a == b and a != c


def test_top_k_top_p_filtering():
    logits = jnp.broadcast_to(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), (2000, 4))  # 2000 independent rows
    draw = lambda s: np.asarray(decode.sample(logits, jax.random.key(0), s))  # noqa: E731
    assert set(draw(decode.SamplingConfig(1.0, top_k=2))) == {0, 1}
    assert set(draw(decode.SamplingConfig(1.0, top_p=0.7))) == {0, 1}    # 0.5 + 0.3 covers 0.7
    assert set(draw(decode.SamplingConfig(1.0, top_p=0.85))) == {0, 1, 2}


def test_sharded_decode_equals_single_device(ref):
    _, cfg, params = ref
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    prompts = [[1, 7, 9, 11], [1, 30], [1, 4, 4]]
    assert decode.generate(params, cfg, prompts, 10, eos_id=-1, mesh=mesh) == \
        decode.generate(params, cfg, prompts, 10, eos_id=-1)


def test_bad_prompts_raise_named_errors(ref):
    _, cfg, params = ref
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        decode.generate(params, cfg, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="prompt 0: .*exceeds the model's max_seq_len"):
        decode.generate(params, cfg, [[1] * 10], cfg.max_seq_len)
    with pytest.raises(ValueError, match=r"token id\(s\) \[500\]"):
        decode.generate(params, cfg, [[1, 500]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode.generate(params, cfg, [[1, 2]], 0)


@pytest.mark.parametrize("chunk", [1, 3, W, 2 * W + 5])
def test_chunked_prefill_matches_mistral_inference_buffer_cache(ref, seq, tmp_path_factory, chunk):
    """Next-token logits after a prompt prefilled in chunks equal mistral-inference's BufferCache prefill."""
    from mistral_jax.convert import write_mistral
    from tests.mistral_ref import load_mi, mi_logits

    _, cfg, params = ref
    folder = tmp_path_factory.getbasetemp() / "mi_w8"
    if not folder.exists():
        write_mistral(folder, cfg, params)
    mi = load_mi(folder)
    theirs = np.stack(mi_logits(mi, np.asarray(seq).tolist(), chunk_size=chunk))
    ours = np.asarray(decode.forward_cached(params, seq, cfg=cfg, chunk=chunk))
    assert np.abs(ours[:, -1] - theirs[:, -1]).max() <= 1e-4     # next-token logits
    assert np.abs(ours - theirs).max() <= 1e-4                   # and every position on the way


def test_decode_cache_is_sharded_over_the_mesh(ref):
    _, cfg, params = ref
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    p = jax.device_put(params, model.param_shardings(cfg, mesh))
    toks = jax.device_put(jnp.ones((4, 8), jnp.int32), sharding.batch_sharding(mesh, 2))
    lens = jax.device_put(jnp.full((4,), 8, jnp.int32), sharding.batch_sharding(mesh, 1))
    _, cache = decode._generate(p, toks, lens, jax.random.key(0), cfg=cfg, dtype=jnp.float32, chunk=8,
                                cache_len=W, max_new=4, sampling=decode.SamplingConfig(), eos_id=-1)
    spec = jax.sharding.PartitionSpec
    assert cache[0]["k"].sharding.spec == spec(("data", "fsdp"), None, "tensor")
    assert cache[0]["pos"].sharding.spec == spec(("data", "fsdp"))
    assert cache[0]["k"].addressable_shards[0].data.shape == (1, W, cfg.n_kv_heads // 2, cfg.head_dim)

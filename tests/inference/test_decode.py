"""Rolling-buffer cache, chunked prefill and the jitted batch decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.model import cache as kv_cache
from mistral_jax.inference import decode
from mistral_jax.model import transformer as model
from mistral_jax.model import sharding
from mistral_jax.checkpoint import weights
from mistral_jax.model.config import ModelConfig
from tests.inference.decode_helpers import clear_programs, forward_cached
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
    stepwise = np.asarray(forward_cached(params, seq, cfg=cfg, chunk=1))
    assert np.abs(stepwise - full_logits).max() <= 1e-5


@pytest.mark.parametrize("chunk", [3, W, 2 * W + 5, 5 * W + 3])
def test_chunked_prefill_equals_one_shot(ref, seq, full_logits, chunk):
    _, cfg, params = ref
    out = np.asarray(forward_cached(params, seq, cfg=cfg, chunk=chunk))
    assert np.abs(out - full_logits).max() <= 1e-5


def test_cache_write_keeps_last_slots_and_positions():
    cfg = ModelConfig.preset("tiny").replace(sliding_window=4, n_layers=1)
    c = {k: v[0] for k, v in kv_cache.init_cache(cfg, 2, 4).items()}   # the one layer's slice
    pos = jnp.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, -1, -1, -1]])
    k = jnp.broadcast_to(pos[:, :, None, None].astype(jnp.float32), (2, 6, cfg.n_kv_heads, cfg.head_dim))
    c = kv_cache.write(c, k, k, pos)
    assert c["pos"].tolist() == [[4, 5, 2, 3], [0, 1, 2, -1]]       # slot p mod 4; padding not written
    assert c["k"][0, :, 0, 0].tolist() == [4.0, 5.0, 2.0, 3.0]


@pytest.mark.as_shipped
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_step_writes_the_cache_in_place(dtype):
    """One decode step (cache donated, as generate's loop carries it) holds under half the cache in temp memory:
    the layers return their new keys and values and one scatter stores them (cache.write_layers), so the
    layer scan restacks no copy of the cache (it did: 1.13x / 1.33x of the cache at these shapes). What is
    left is one layer's keys and values read for attention, 1/16 of the cache, widened to float32 for bf16."""
    cfg = ModelConfig(dim=64, n_layers=16, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=256,
                      sliding_window=None, max_seq_len=4096)
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0), param_dtype=dtype))
    temp = decode.compile_step(params, cfg, 4, 2048, dtype).memory_analysis().temp_size_in_bytes
    cache = kv_cache.cache_bytes(jax.eval_shape(lambda: kv_cache.init_cache(cfg, 4, 2048, dtype)))
    assert temp < 0.5 * cache, f"{jnp.dtype(dtype).name} decode step: {temp} bytes of temp for a {cache}-byte cache"


@pytest.mark.slow
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


def test_rows_stop_on_eos_at_different_steps_like_hf_generate(ref):
    import torch
    r, cfg, params = ref
    rs = np.random.RandomState(5)      # the prompts and length of test_batch_of_different_lengths: one compile
    prompts = [rs.randint(3, cfg.vocab_size, n).tolist() for n in (3, 2 * W + 1, W)]
    n = 2 * W
    greedy = decode.generate(params, cfg, prompts, n, eos_id=-1)

    def first(row, t):
        return row.index(t) if t in row else None
    # An eos id that rows 0 and 1 produce first at different steps and row 2 never does.
    eos = next((t for t in greedy[0] if first(greedy[1], t) not in (None, first(greedy[0], t))
                and t not in greedy[2]), None)
    assert eos is not None, f"no suitable eos id in the greedy outputs {greedy}"
    out = decode.generate(params, cfg, prompts, n, eos_id=eos, return_info=True)
    for p, g, toks, stopped in zip(prompts, greedy, out.tokens, out.stopped_on_eos):
        with torch.no_grad():
            hf = r.model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                                  pad_token_id=0)[0, len(p):].tolist()
        hf_stopped = eos in hf
        assert stopped == hf_stopped
        assert toks == (hf[:hf.index(eos)] if hf_stopped else hf)
        assert toks == (g[:first(g, eos)] if hf_stopped else g)
    assert out.stopped_on_eos == [True, True, False]
    assert len(out.tokens[0]) != len(out.tokens[1]) and len(out.tokens[2]) == n


def test_sampling_is_reproducible_and_per_row(ref):
    _, cfg, params = ref
    prompts = [[1, 7, 9, 11], [1, 30]]       # (the filters themselves: tests/test_sampling.py)
    kw = dict(eos_id=-1, temperature=1.0, top_k=50, top_p=0.9)
    a = decode.generate(params, cfg, prompts, 12, seed=7, **kw)
    assert a == decode.generate(params, cfg, prompts, 12, seed=7, **kw)
    assert a != decode.generate(params, cfg, prompts, 12, seed=8, **kw)
    # A row's sample depends on (seed, row id), not on its position in the batch or its neighbours
    # (same batch shape as above: no new compilation).
    assert decode.generate(params, cfg, prompts[::-1], 12, seed=7, row_ids=[1, 0], **kw) == a[::-1]
    same = decode.generate(params, cfg, [prompts[0]] * 2, 12, seed=7, row_ids=[5, 0], **kw)
    assert same[1] == a[0] and same[0] != a[0]
    with pytest.raises(ValueError, match="seed must be an integer"):
        decode.generate(params, cfg, prompts, 4, seed=2**32)
    with pytest.raises(ValueError, match="row_ids must be 2 integers"):
        decode.generate(params, cfg, prompts, 4, row_ids=[0])


def test_sharded_decode_equals_single_device(ref):
    _, cfg, params = ref
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    prompts = [[1, 7, 9, 11], [1, 30], [1, 4, 4]]
    assert decode.generate(params, cfg, prompts, 10, eos_id=-1, mesh=mesh) == \
        decode.generate(params, cfg, prompts, 10, eos_id=-1)


def test_bad_prompts_raise_named_errors(ref):
    _, cfg, params = ref
    with pytest.raises(ValueError, match=r"^generate: prompts\[1\]: empty prompt$"):
        decode.generate(params, cfg, [[1, 2], []], 4)
    with pytest.raises(ValueError, match=r"^generate: prompts\[0\]: .*exceeds the model's max_seq_len"):
        decode.generate(params, cfg, [[1] * 10], cfg.max_seq_len)
    with pytest.raises(ValueError, match=r"token id\(s\) \[500\]"):
        decode.generate(params, cfg, [[1, 500]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode.generate(params, cfg, [[1, 2]], 0)
    with pytest.raises(ValueError, match=f"eos_id must be -1 .* got {cfg.vocab_size}"):
        decode.generate(params, cfg, [[1, 2]], 4, eos_id=cfg.vocab_size)
    with pytest.raises(ValueError, match="prefill_chunk must be an integer >= 1, got -5"):
        decode.generate(params, cfg, [[1, 2]], 4, prefill_chunk=-5)


def test_forward_cached_refuses_a_cache_smaller_than_the_window(ref, seq, full_logits):
    _, cfg, params = ref
    with pytest.raises(ValueError, match=f"cache_len {W - 1} is smaller than the {W} slots .* window {W}"):
        forward_cached(params, seq, cfg=cfg, chunk=3, cache_len=W - 1)
    no_window = cfg.replace(sliding_window=None)
    with pytest.raises(ValueError, match="cache_len 10 is smaller than the 12 slots required for 12 tokens"):
        forward_cached(params, seq[:, :12], cfg=no_window, chunk=4, cache_len=10)
    bigger = np.asarray(forward_cached(params, seq, cfg=cfg, chunk=3, cache_len=2 * W))
    assert np.abs(bigger - full_logits).max() <= 1e-5                    # a larger cache is fine


@pytest.mark.parametrize("chunk", [1, 3, W, 2 * W + 5])
def test_chunked_prefill_matches_mistral_inference_buffer_cache(ref, seq, tmp_path_factory, chunk):
    """Next-token logits after a prompt prefilled in chunks equal mistral-inference's BufferCache prefill."""
    from mistral_jax.checkpoint.torch_write import write_mistral
    from tests.mistral_ref import load_mi, mi_logits

    _, cfg, params = ref
    folder = tmp_path_factory.getbasetemp() / "mi_w8"
    if not folder.exists():
        write_mistral(folder, cfg, params)
    mi = load_mi(folder)
    theirs = np.stack(mi_logits(mi, np.asarray(seq).tolist(), chunk_size=chunk))
    ours = np.asarray(forward_cached(params, seq, cfg=cfg, chunk=chunk))
    assert np.abs(ours[:, -1] - theirs[:, -1]).max() <= 1e-4     # next-token logits
    assert np.abs(ours - theirs).max() <= 1e-4                   # and every position on the way


@pytest.mark.slow   # one of the everyday subset's longest (issue 20, point 7)
def test_decode_cache_is_sharded_over_the_mesh(ref):
    _, cfg, params = ref
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    p = jax.device_put(params, model.param_shardings(cfg, mesh))
    toks = jax.device_put(jnp.ones((4, 8), jnp.int32), sharding.batch_sharding(mesh, 2))
    lens = jax.device_put(jnp.full((4,), 8, jnp.int32), sharding.batch_sharding(mesh, 1))
    live = jax.device_put(jnp.ones((4,), bool), sharding.batch_sharding(mesh, 1))
    keys = jax.random.key_data(decode.row_keys(0, jnp.arange(4)))
    _, cache, _ = decode._generate(p, toks, lens, keys, live, jnp.int32(4), cfg=cfg,
                                   dtype=jnp.float32, chunk=8, cache_len=W, max_new=4,
                                   sampling=decode.SamplingConfig(), eos_id=-1)
    spec = jax.sharding.PartitionSpec
    assert cache["k"].shape == (cfg.n_layers, 4, W, cfg.n_kv_heads, cfg.head_dim)   # layers stacked, unsplit
    assert cache["k"].sharding.spec == spec(None, ("data", "fsdp"), None, "tensor")
    assert cache["pos"].sharding.spec == spec(None, ("data", "fsdp"))
    assert cache["k"].addressable_shards[0].data.shape == (cfg.n_layers, 1, W, cfg.n_kv_heads // 2, cfg.head_dim)


def _lengths_prompts(cfg, lengths, seed):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, cfg.vocab_size, n).tolist() for n in lengths]


@pytest.mark.slow
def test_bucketed_shapes_give_the_same_tokens_as_exact_shapes(ref):
    """Padding prompts, cache and output up to length buckets changes no greedy or sampled token."""
    _, cfg, params = ref
    prompts = _lengths_prompts(cfg, (3, 2 * W + 1, W, 5 * W - 1), 11)
    sampled = dict(temperature=1.0, top_k=20, seed=3)
    for kw in ({}, sampled):
        exact = decode.generate(params, cfg, prompts, 3 * W, eos_id=-1, bucket_smallest=None, return_info=True, **kw)
        bucketed = decode.generate(params, cfg, prompts, 3 * W, eos_id=-1, return_info=True, **kw)
        assert exact.shapes.prompt_len == 5 * W and exact.shapes.out_len == 3 * W          # exact lengths ...
        assert bucketed.shapes.prompt_len == 64 and bucketed.shapes.out_len == 64          # ... vs the bucket
        assert bucketed.tokens == exact.tokens
        assert all(len(t) == 3 * W for t in bucketed.tokens) and len({tuple(t) for t in bucketed.tokens}) == 4


@pytest.mark.slow
def test_twenty_prompt_lengths_compile_a_handful_of_programs(ref):
    _, cfg, params = ref
    lengths = [1 + 10 * i for i in range(20)]                       # 1 .. 191 tokens: 20 different lengths
    clear_programs()                        # count these calls' programs alone, whatever ran before
    outs = [decode.generate(params, cfg, [p], 3, eos_id=-1) for p in _lengths_prompts(cfg, lengths, 12)]
    assert all(len(o[0]) == 3 for o in outs)
    assert decode.compiled_programs() == 3                         # buckets 64, 128, 256


@pytest.fixture(scope="module")
def eos_case(ref):
    """(prompt, its greedy continuation, an eos id it emits first at step >= 2 that a filler row never emits)."""
    _, cfg, params = ref
    prompt = _lengths_prompts(cfg, (W + 2,), 13)[0]
    greedy = decode.generate(params, cfg, [prompt], 3 * W, eos_id=-1)[0]
    filler = decode.generate(params, cfg, [[cfg.bos_id]], 3 * W, eos_id=-1)[0]      # what a filler row would say
    eos = next((t for t in greedy[2:] if t not in filler and t not in greedy[:greedy.index(t)]), None)
    assert eos is not None, f"no suitable eos id in {greedy} (filler row: {filler})"
    return prompt, greedy, eos


@pytest.mark.slow
def test_filler_rows_start_finished_and_do_not_extend_the_loop(ref, eos_case):
    _, cfg, params = ref
    prompt, greedy, eos = eos_case
    n, stop = 3 * W, greedy.index(eos)
    info = decode.generate(params, cfg, [prompt], n, eos_id=eos, pad_batch_to=4, return_info=True)
    assert info.tokens == [greedy[:stop]] and info.stopped_on_eos == [True]
    # The loop ended at the real row's EOS although the filler rows, if they ran, would never emit it.
    assert info.decode_steps == stop
    # The same program (same shapes: no new compilation) leaves every filler row's output at -1.
    s = info.shapes
    toks = np.zeros((4, s.prompt_len), np.int32)
    toks[0, :len(prompt)], toks[1:, 0] = prompt, cfg.bos_id
    out, _, steps = decode._generate(
        params, jnp.asarray(toks), jnp.array([len(prompt), 1, 1, 1], jnp.int32),
        jax.random.key_data(decode.row_keys(0, jnp.zeros(4, int))),
        jnp.array([True, False, False, False]), jnp.int32(n), cfg=cfg, dtype=jnp.dtype(jnp.float32), chunk=s.chunk,
        cache_len=s.cache_len, max_new=s.out_len, sampling=decode.SamplingConfig(), eos_id=jnp.int32(eos))
    out = np.asarray(out)
    assert int(steps) == stop and (out[1:] == -1).all() and out[0, :stop + 1].tolist() == greedy[:stop + 1]


def test_mesh_padding_rows_start_finished(ref, eos_case):
    _, cfg, params = ref
    prompt, greedy, eos = eos_case
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)         # 1 prompt + 3 rows of mesh padding
    info = decode.generate(params, cfg, [prompt], 3 * W, eos_id=eos, mesh=mesh, return_info=True)
    assert info.tokens == [greedy[:greedy.index(eos)]] and info.decode_steps == greedy.index(eos)

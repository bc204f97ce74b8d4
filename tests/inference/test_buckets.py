"""Length buckets and the static decode shapes derived from them (pure Python: nothing is compiled)."""

import pytest

from mistral_jax.inference import decode
from mistral_jax.inference.buckets import bucket_for, length_buckets
from mistral_jax.model.config import ModelConfig


def test_length_buckets_double_up_to_max_len():
    assert length_buckets(1000) == (64, 128, 256, 512, 1000)
    assert length_buckets(1024) == (64, 128, 256, 512, 1024)
    assert length_buckets(40) == (40,)
    assert length_buckets(1000, smallest=100, multiple=48) == (144, 240, 432, 816, 1008)
    for b in length_buckets(5000, smallest=3, multiple=7):
        assert b % 7 == 0
    with pytest.raises(ValueError, match="^length_buckets: smallest must be an integer >= 1, got 0$"):
        length_buckets(100, smallest=0)


def test_bucket_for_is_the_smallest_bucket_that_fits():
    b = length_buckets(1000)
    assert [bucket_for(n, b) for n in (1, 64, 65, 129, 513, 1000)] == [64, 64, 128, 256, 1000, 1000]
    with pytest.raises(ValueError, match="^length 1001 exceeds the largest bucket 1000$"):
        bucket_for(1001, b)


LENGTHS = [1 + 13 * i for i in range(20)]      # 20 prompt lengths, 1 .. 248: buckets 64, 128, 256


@pytest.mark.parametrize("window", [256, None])
def test_twenty_prompt_lengths_share_a_few_shapes(window):
    cfg = ModelConfig.preset("tiny").replace(sliding_window=window, max_seq_len=4096)
    new = 100
    bucketed = [decode.decode_shapes(cfg, n, new) for n in LENGTHS]
    exact = [decode.decode_shapes(cfg, n, new, bucket_smallest=None) for n in LENGTHS]
    assert len(set(bucketed)) == 3 and len(set(exact)) == 20
    for n, s in zip(LENGTHS, bucketed):
        assert s.prompt_len >= n and s.prompt_len % s.chunk == 0 and s.out_len >= new
        if window is None:
            assert s.chunk == s.prompt_len and s.cache_len >= n + new         # the cache holds every position
        else:
            # a rolling buffer, never more than the window
            assert s.chunk == min(window, s.prompt_len) and s.cache_len == min(window, s.prompt_len + s.out_len)
    # a different max_new_tokens within the same bucket shares the shapes too
    assert decode.decode_shapes(cfg, 50, 3) == decode.decode_shapes(cfg, 60, 64)


def test_decode_shapes_exact_and_named_errors():
    cfg = ModelConfig.preset("tiny").replace(sliding_window=16, max_seq_len=1024)
    assert decode.decode_shapes(cfg, 10, 5, bucket_smallest=None) == decode.DecodeShapes(10, 10, 15, 5)
    assert decode.decode_shapes(cfg, 40, 5, prefill_chunk=16, bucket_smallest=None) == \
        decode.DecodeShapes(48, 16, 16, 5)
    assert decode.decode_shapes(cfg, 40, 5, prefill_chunk=3) == decode.DecodeShapes(66, 3, 16, 64)
    assert decode.decode_shapes(cfg.replace(sliding_window=None), 100, 5) == decode.DecodeShapes(128, 128, 192, 64)
    with pytest.raises(ValueError, match="^decode_shapes: max_prompt_len must be an integer >= 1, got 0$"):
        decode.decode_shapes(cfg, 0, 5)
    with pytest.raises(ValueError, match="^decode_shapes: prefill_chunk must be an integer >= 1, got 0$"):
        decode.decode_shapes(cfg, 4, 5, prefill_chunk=0)

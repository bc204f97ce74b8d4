"""FLOP counting against hand computations for Mistral 7B v0.1."""

import pytest

from mistral_jax.model import flops
from mistral_jax.model.config import ModelConfig
from mistral_jax.model.transformer import count_params


@pytest.fixture(scope="module")
def cfg7b() -> ModelConfig:
    return ModelConfig.preset("mistral-7b-v0.1")


def test_matmul_params_7b_by_hand(cfg7b):
    # per layer: wq 4096*32*128 = 16,777,216; wk = wv = 4096*8*128 = 4,194,304; wo = 16,777,216;
    # w1 + w3 + w2 = 3*4096*14336 = 176,160,768 -> 218,103,808 per layer, x32 = 6,979,321,856;
    # output head 4096*32000 = 131,072,000.
    assert flops.matmul_params(cfg7b) == 6_979_321_856 + 131_072_000


def test_matmul_params_plus_embedding_and_norms_is_param_count(cfg7b):
    norms = (2 * cfg7b.n_layers + 1) * cfg7b.dim
    embedding = cfg7b.vocab_size * cfg7b.dim
    assert flops.matmul_params(cfg7b) + embedding + norms == count_params(cfg7b) == 7_241_732_096


def test_attention_span_with_window():
    # T = 8192, W = 4096: positions 0..4095 see p+1 keys (sum 4096*4097/2), the other 4096 see 4096.
    assert flops.mean_attention_span(8192, 4096) == pytest.approx((4096 * 4097 / 2 + 4096 * 4096) / 8192)
    assert flops.mean_attention_span(8192, 4096) == 3072.25
    assert flops.mean_attention_span(4096, 4096) == 2048.5  # window never binds: (T + 1) / 2
    assert flops.mean_attention_span(4096, None) == 2048.5
    assert flops.mean_attention_span(100, 1) == 1.0


def test_train_flops_per_token_7b_by_hand(cfg7b):
    # forward: 2 * 7,110,393,856 = 14,220,787,712 for the matmuls;
    # attention: 32 layers * 2 matmuls (QK^T, PV) * 2 FLOPs * 32 heads * 128 * span 3072.25 = 1,610,743,808.
    fwd = 14_220_787_712 + 1_610_743_808
    assert flops.forward_flops_per_token(cfg7b, 8192) == fwd
    assert flops.train_flops_per_token(cfg7b, 8192) == 3 * fwd == 47_494_594_560


def test_gqa_counts_smaller_kv_projections(cfg7b):
    mha = cfg7b.replace(n_kv_heads=cfg7b.n_heads)
    # full-size k and v projections add 2 * 4096 * (32 - 8) * 128 weights per layer.
    assert flops.matmul_params(mha) - flops.matmul_params(cfg7b) == 32 * 2 * 4096 * 24 * 128


def test_mfu():
    assert flops.mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="peak_flops"):
        flops.mfu(1.0, 1.0, 0.0)

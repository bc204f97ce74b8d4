"""Shared test setup: 8 simulated CPU devices and session-scoped reference models."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests import hf_ref  # noqa: E402


@pytest.fixture(scope="session")
def hf_gqa(tmp_path_factory):
    """Random HF MistralForCausalLM, 8 query / 2 kv heads, window 16, saved with save_pretrained."""
    return hf_ref.make_hf_model(tmp_path_factory.mktemp("hf_gqa"), n_heads=8, n_kv_heads=2, window=16, seed=0)


@pytest.fixture(scope="session")
def hf_mha(tmp_path_factory):
    """Random HF MistralForCausalLM, 4 query / 4 kv heads, window 16."""
    return hf_ref.make_hf_model(tmp_path_factory.mktemp("hf_mha"), n_heads=4, n_kv_heads=4, window=16, seed=1)


@pytest.fixture(scope="session")
def hf_v02(tmp_path_factory):
    """Random HF MistralForCausalLM shaped like v0.2: no sliding window, rope theta 1e6 (vocab kept tiny)."""
    return hf_ref.make_hf_model(tmp_path_factory.mktemp("hf_v02"), n_heads=8, n_kv_heads=2, window=None,
                                theta=1e6, seed=2)


@pytest.fixture(scope="session")
def hf_v03(tmp_path_factory):
    """Random HF MistralForCausalLM shaped like v0.3: vocab 32768, no sliding window, rope theta 1e6."""
    return hf_ref.make_hf_model(tmp_path_factory.mktemp("hf_v03"), n_heads=8, n_kv_heads=2, window=None,
                                theta=1e6, vocab=32768, seed=3)

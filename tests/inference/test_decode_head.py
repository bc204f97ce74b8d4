"""The decode head transposed to (V, D): same logits and tokens, read in that layout, transposed once per head."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.inference import decode, head
from mistral_jax.model import packing
from mistral_jax.model import transformer as model
from mistral_jax.model.config import ModelConfig

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=256,
                  sliding_window=16, max_seq_len=256)


@pytest.fixture(scope="module")
def params():
    # a wider init than the default keeps greedy tokens from repeating one id
    p = model.init_params(CFG, jax.random.key(0))
    return jax.tree_util.tree_map(lambda x: x * 4.0 if x.ndim > 1 else x, p)


def test_logits_with_the_transposed_head_equal_the_plain_head(params):
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, CFG.vocab_size, (4, 9)))
    plain, _ = model.Transformer(CFG).apply({"params": params}, tokens)
    moved, _ = model.Transformer(CFG).apply({"params": params}, tokens, head_VD=params["output"].T)
    assert np.abs(np.asarray(moved) - np.asarray(plain)).max() <= 1e-5
    with pytest.raises(ValueError, match=r"head_VD has shape \(64, 256\)"):
        model.Transformer(CFG).apply({"params": params}, tokens, head_VD=params["output"])


def test_generate_at_four_rows_uses_the_transposed_head_and_gives_the_same_tokens(params, monkeypatch):
    prompts = [list(np.random.RandomState(i).randint(3, CFG.vocab_size, 5 + 3 * i)) for i in range(4)]
    assert decode.uses_fused_matvec(None)            # the CPU backend: the rule below applies
    assert head.uses_transposed_head(packing.pack(params), 4, True)
    assert not head.uses_transposed_head(packing.pack(params), 2, True)
    assert not head.uses_transposed_head(packing.pack(params), 8, False)
    seen = []
    real = decode.transposed_head
    monkeypatch.setattr(decode, "transposed_head", lambda w: seen.append(w.shape) or real(w))
    moved = decode.generate(params, CFG, prompts, 24, eos_id=-1)
    assert seen == [(CFG.dim, CFG.vocab_size)]
    monkeypatch.setattr(decode, "uses_transposed_head", lambda *a: False)
    plain = decode.generate(params, CFG, prompts, 24, eos_id=-1)
    assert moved == plain
    assert len({t for row in plain for t in row}) > 8


def _head_dot(batch: int) -> str:
    abstract = jax.eval_shape(lambda: model.init_params(CFG, jax.random.key(0)))
    hlo = decode.compile_step(abstract, CFG, batch, 32).as_text()
    dots = [line for line in hlo.splitlines() if " dot(" in line and f"f32[{batch},{CFG.vocab_size}]" in line]
    assert len(dots) == 1, dots
    return dots[0]


def test_decode_step_reads_the_head_as_vocab_by_dim_from_four_rows():
    """The step's head product contracts the weight's second axis (a (V, D) operand) at 4 rows, its first (the
    stored (D, V) head) at 2."""
    assert "rhs_contracting_dims={1}" in _head_dot(4)
    assert "rhs_contracting_dims={0}" in _head_dot(2)


def test_transposed_head_is_kept_while_its_jax_array_lives():
    w = jax.random.normal(jax.random.key(1), (8, 24))
    first = head.transposed_head(w)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(w).T)
    assert head.transposed_head(w) is first                     # kept: one transpose per head
    other = jax.random.normal(jax.random.key(2), (8, 24))
    assert head.transposed_head(other) is not first              # another head: transposed anew
    del w, first, other
    gc.collect()
    assert head._last_head == []                                # nothing kept once the head is gone
    w_np = np.ones((8, 24), np.float32)
    assert head.transposed_head(w_np) is not head.transposed_head(w_np)   # numpy may change in place

"""decode.sample against its definition: empirical frequencies over many keys vs the filtered softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mistral_jax.inference import decode

N = 20_000
LOGITS = np.array([2.0, 1.5, 1.1, 0.6, 0.0, -0.7, -1.5], np.float64)


def expected_probs(logits: np.ndarray, s: decode.SamplingConfig) -> np.ndarray:
    """softmax(logits / T), restricted to the top_k (renormalised), then to the top_p prefix (renormalised)."""
    p = np.exp(logits / s.temperature - (logits / s.temperature).max())
    p /= p.sum()
    order = np.argsort(-logits, kind="stable")
    keep = np.zeros(len(p), bool)
    keep[order[:s.top_k or len(p)]] = True
    p = np.where(keep, p, 0.0) / p[keep].sum()
    if s.top_p < 1:
        sorted_p = p[order]
        before = np.cumsum(sorted_p) - sorted_p
        assert np.abs(before - s.top_p).min() > 1e-3, "top_p too close to a cumulative mass: a fragile case"
        keep_sorted = (before < s.top_p) & (sorted_p > 0)
        keep = np.zeros(len(p), bool)
        keep[order[keep_sorted]] = True
        p = np.where(keep, p, 0.0) / p[keep].sum()
    return p


def _draws(logits_V: jax.Array, key: jax.Array, s: decode.SamplingConfig) -> jax.Array:
    logits_NV = jnp.broadcast_to(logits_V, (N, logits_V.shape[0]))
    return decode.sample(logits_NV, jax.random.split(key, N), s)    # one key per row


def frequencies(logits: np.ndarray, s: decode.SamplingConfig, seed: int = 0) -> np.ndarray:
    draws = np.asarray(_draws(jnp.asarray(logits, jnp.float32), jax.random.key(seed), s))
    return np.bincount(draws, minlength=len(logits)) / N


@pytest.mark.parametrize("s", [
    decode.SamplingConfig(0.5), decode.SamplingConfig(1.0), decode.SamplingConfig(2.0),
    decode.SamplingConfig(1.0, top_k=3), decode.SamplingConfig(0.8, top_p=0.75),
    decode.SamplingConfig(0.7, top_k=4, top_p=0.8), decode.SamplingConfig(1.6, top_k=5, top_p=0.9),
], ids=str)
def test_sampling_frequencies_match_the_filtered_softmax(s):
    want = expected_probs(LOGITS, s)
    got = frequencies(LOGITS, s)
    assert np.all(got[want == 0] == 0), f"drew filtered-out tokens: {got} vs {want}"
    sigma = np.sqrt(want * (1 - want) / N)
    assert np.all(np.abs(got - want) <= 5 * sigma + 1e-9), f"frequencies {got.round(4)} vs expected {want.round(4)}"


def test_the_settings_change_the_distribution():
    # The expected distributions differ by far more than the tolerance, so ignoring a setting fails above.
    base = expected_probs(LOGITS, decode.SamplingConfig(1.0))
    for s in (decode.SamplingConfig(0.5), decode.SamplingConfig(2.0), decode.SamplingConfig(1.0, top_k=3),
              decode.SamplingConfig(1.0, top_p=0.75)):
        assert np.abs(expected_probs(LOGITS, s) - base).max() > 20 * np.sqrt(0.25 / N)
    both = expected_probs(LOGITS, decode.SamplingConfig(0.7, top_k=4, top_p=0.8))
    assert np.count_nonzero(both) < np.count_nonzero(expected_probs(LOGITS, decode.SamplingConfig(0.7, top_k=4)))


def test_top_k_keeps_exactly_k_tokens_among_ties():
    ties = np.array([1.0, 1.0, 1.0, 0.0])
    one = frequencies(ties, decode.SamplingConfig(1.0, top_k=1))
    assert np.count_nonzero(one) == 1 and one[0] == 1.0       # ties go to the lowest id
    two = frequencies(ties, decode.SamplingConfig(1.0, top_k=2))
    assert np.count_nonzero(two) == 2 and abs(two[0] - 0.5) <= 5 * np.sqrt(0.25 / N)


def test_greedy_and_per_row_keys():
    logits = jnp.asarray(np.random.RandomState(0).randn(5, 11), jnp.float32)
    assert np.array_equal(decode.sample(logits, jax.random.key(0), decode.SamplingConfig()),
                          np.argmax(np.asarray(logits), -1))
    s = decode.SamplingConfig(1.0)
    flat = jnp.zeros((64, 50), jnp.float32)
    same = decode.row_keys(3, jnp.zeros(64, jnp.uint32))              # one row id for all rows: same draws
    assert len(set(np.asarray(decode.sample(flat, same, s)).tolist())) == 1
    distinct = decode.row_keys(3, jnp.arange(64, dtype=jnp.uint32))   # distinct row ids: independent draws
    assert len(set(np.asarray(decode.sample(flat, distinct, s)).tolist())) > 20


def test_bad_sampling_settings_are_refused():
    for kw, msg in [({"temperature": -1.0}, "temperature"), ({"temperature": float("inf")}, "temperature"),
                    ({"temperature": float("nan")}, "temperature"), ({"top_k": -1}, "top_k"),
                    ({"top_k": 2.5}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(ValueError, match=msg):
            decode.SamplingConfig(**kw)


def test_greedy_is_jnp_argmax_on_ties_infinities_and_nans():
    """decode.first_argmax (greedy sampling) picks what jnp.argmax picks: the first maximum, the first NaN."""
    rng = np.random.RandomState(1)
    x = rng.randint(-3, 4, (64, 37)).astype(np.float32)       # many ties
    x[3] = -np.inf
    x[4, 5] = np.inf
    x[4, 9] = np.inf
    x[5, 7] = np.nan
    x[6, [2, 30]] = np.nan
    x[7] = np.nan
    got = np.asarray(jax.jit(decode.first_argmax)(jnp.asarray(x)))
    assert got.dtype == np.int32
    assert got.tolist() == np.asarray(jnp.argmax(jnp.asarray(x), -1)).tolist()
    assert got[3] == 0 and got[4] == 5 and got[5] == 7 and got[6] == 2 and got[7] == 0

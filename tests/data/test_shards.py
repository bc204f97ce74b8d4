"""Shards: this process's rows of each global batch, padding for finished held-out shards, and the state."""

import json

import numpy as np
import pytest

from mistral_jax.data.rows import TEXT_KEYS
from mistral_jax.data.shards import Exhausted, ShardedStream, assign, merge_states, owned_shards
from mistral_jax.data.text import PackedStream
from mistral_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    for i in range(5):
        (d / f"{i}.txt").write_text(" ".join(f"word{i}x{j}" for j in range(4 + 9 * i)))
    return sorted(d.glob("*.txt"))


def test_owned_shards_and_assign():
    assert [owned_shards(4, p, 2) for p in range(2)] == [range(0, 2), range(2, 4)]
    assert assign(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="data.shards=4 must be a multiple of the number of processes \\(3\\)"):
        owned_shards(4, 0, 3)


def test_held_out_shards_pad_and_the_state_resumes(files):
    tok = Tokenizer()
    parts = assign(files, 3)
    parts[2] = []                                               # a shard without held-out files

    def make(s):
        return PackedStream(parts[s], tok, 16, 2, shuffle=False) if parts[s] else Exhausted(2, 16)

    both = ShardedStream(3, [0, 1, 2], make, endless_padding=True)
    batches = [next(both) for _ in range(12)]
    assert all(set(b) >= set(TEXT_KEYS) and b["tokens"].shape == (6, 16) for b in batches)
    assert not batches[-1]["segment_ids"].any()                 # every shard finished: padding only
    assert not any(b["segment_ids"][4:].any() for b in batches)    # the empty shard only pads
    # two "processes", each with its own shards, resume from their merged state
    one, two = ShardedStream(3, [0], make, endless_padding=True), ShardedStream(3, [1, 2], make, endless_padding=True)
    for _ in range(2):
        next(one), next(two)
    state = json.loads(json.dumps(merge_states([one.state(), two.state()])))
    again = ShardedStream(3, [0, 1, 2], make, endless_padding=True)
    again.restore(state)
    for want in batches[2:6]:
        got = next(again)
        assert all(np.array_equal(got[k], want[k]) for k in TEXT_KEYS)
    with pytest.raises(ValueError, match="this process needs \\[2\\]"):
        ShardedStream(3, [2], make).restore(one.state())
    with pytest.raises(ValueError, match="no per-shard positions"):
        ShardedStream(1, [0], make).restore({"epoch": 0, "group": 0, "row": 0, "seed": 0})

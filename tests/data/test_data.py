"""Packing, deterministic shuffling, exact resumption and file splitting of the pretraining data stream."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mistral_jax.data import text as data
from mistral_jax.training.run_config import DataSection
from mistral_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Nine small text files of different lengths (one empty)."""
    d = tmp_path_factory.mktemp("corpus")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for i in range(9):
        text = " ".join(f"{words[(i + j) % 10]}{i}" for j in range(3 + 7 * i)) if i != 4 else ""
        (d / f"doc{i}.txt").write_text(text)
    return sorted(d.glob("*.txt"))


def test_pack_documents_exact_layout():
    docs = [[11, 12, 13, 14, 15], [21, 22, 23], list(range(31, 41))]
    rows = list(data.pack_documents(docs, seq_len=8))
    assert len(rows) == 3
    np.testing.assert_array_equal(rows[0]["tokens"], [11, 12, 13, 14, 15, 21, 22, 23])
    np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 3, 4, 0, 1, 2])
    # the 10-token document fills row 1 and continues in row 2 with positions 8, 9; then padding.
    np.testing.assert_array_equal(rows[1]["tokens"], range(31, 39))
    np.testing.assert_array_equal(rows[1]["positions"], range(8))
    np.testing.assert_array_equal(rows[2]["tokens"], [39, 40, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows[2]["positions"], [8, 9, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(rows[2]["segment_ids"], [1, 1, 0, 0, 0, 0, 0, 0])


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_stream_resumes_exactly_across_groups_and_epochs(corpus, tokenizer):
    make = lambda seed=0: data.PackedStream(corpus, tokenizer, seq_len=16, batch_size=3, seed=seed,
                                            shuffle_files=4)
    reference = _take(make(), 24)
    first = make()
    _take(first, 5)
    state = json.loads(json.dumps(first.state()))  # the state is a small JSON-able dict
    assert set(state) == {"epoch", "group", "row", "seed"}
    resumed = make()
    resumed.restore(state)
    later = _take(resumed, 19)
    assert resumed.state()["epoch"] >= 1, "test should cross an epoch boundary"
    for a, b in zip(reference[5:], later):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other_seed = _take(make(seed=1), 24)
    assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(reference, other_seed))
    with pytest.raises(ValueError, match="seed"):
        make(seed=1).restore(state)
    with pytest.raises(ValueError, match="field 'group' must be a non-negative int"):
        make().restore({"epoch": state["epoch"], "window": state["group"], "row": state["row"], "seed": 0})


def test_epoch_covers_every_token_once(corpus, tokenizer):
    stream = data.PackedStream(corpus, tokenizer, seq_len=16, batch_size=1, seed=3, shuffle_files=4)
    expected = Counter(t for doc in data.read_documents(corpus, tokenizer) for t in doc)
    seen = Counter()
    while sum(seen.values()) < sum(expected.values()):
        row = stream.next_row()
        seen.update(row["tokens"][row["segment_ids"] > 0].tolist())
    assert stream.state()["epoch"] == 0
    assert seen == expected
    stream.next_row()
    assert stream.state()["epoch"] == 1


def test_attention_segments_follow_documents(corpus, tokenizer):
    """Within a row, each segment is one contiguous run whose positions count up by one."""
    stream = data.PackedStream(corpus, tokenizer, seq_len=32, batch_size=4, seed=0, shuffle_files=3)
    for _ in range(3):
        b = next(stream)
        for seg, pos in zip(b["segment_ids"], b["positions"]):
            for s in set(seg[seg > 0].tolist()):
                idx = np.flatnonzero(seg == s)
                assert np.all(np.diff(idx) == 1)
                assert np.all(np.diff(pos[idx]) == 1)


def test_eval_stream_is_one_ordered_pass(corpus, tokenizer):
    stream = data.PackedStream(corpus, tokenizer, seq_len=64, batch_size=4, shuffle=False)
    batches = list(stream)
    n_tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert n_tokens == sum(len(d) for d in data.read_documents(corpus, tokenizer))
    assert batches[-1]["tokens"].shape == (4, 64)
    with pytest.raises(StopIteration):
        next(stream)


def test_split_is_stable_and_disjoint(corpus):
    train, val = data.split_files(corpus, 30.0)
    assert sorted(train + val) == list(corpus) and not set(train) & set(val)
    assert data.split_files(list(reversed(corpus)), 30.0)[1] == list(reversed(val))
    assert data.split_files(corpus, 0.0) == (list(corpus), [])


def test_stdlib_source_lists_python_files():
    corpus = data.list_files(DataSection(source="stdlib", pattern="json/*.py"))
    names = {f.name for f in corpus.files}
    assert {"decoder.py", "encoder.py", "__init__.py"} <= names
    with pytest.raises(data.DataError, match="no files"):
        data.list_files(DataSection(source="files", paths=("/nonexistent/*.txt",)))


def test_exclude_is_relative_to_the_corpus_root_and_skips_are_counted(tmp_path):
    root = tmp_path / "tests" / "corpus"  # the corpus itself lives under a folder named 'tests'
    (root / "test").mkdir(parents=True)
    (root / "sub").mkdir()
    (root / "a.txt").write_text("small")
    (root / "sub" / "b.txt").write_text("small too")
    (root / "big.txt").write_text("x" * 101)
    (root / "test" / "c.txt").write_text("excluded: 'test' below the root")
    d = DataSection(source="files", paths=(f"{root}/**/*.txt",), max_bytes=100)
    corpus = data.list_files(d)
    assert [f.name for f in corpus.files] == ["a.txt", "b.txt"]
    assert (corpus.n_large, corpus.n_excluded) == (1, 1)
    line = corpus.describe(d.max_bytes)
    assert line.startswith("data: 2 files") and "1 skipped: larger than data.max_bytes=100" in line
    assert "1 excluded by data.exclude" in line
    # a glob without wildcards: its own directory is the root
    assert data.list_files(DataSection(source="files", paths=(str(root / "a.txt"),))).files == [root / "a.txt"]
    assert data.glob_base("x/y/**/*.py") == Path("x/y") and data.glob_base("*.py") == Path(".")


def test_corpus_without_text_is_a_data_error(tmp_path, tokenizer):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(" \n")
    stream = data.PackedStream(sorted(tmp_path.glob("*.txt")), tokenizer, seq_len=8, batch_size=2, shuffle_files=2)
    with pytest.raises(data.DataError, match="none of the 3 files has any text"):
        next(stream)

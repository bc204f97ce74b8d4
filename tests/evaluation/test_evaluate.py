"""Scoring and `python -m infer.evaluate`: log-likelihoods against HF PyTorch on the same weights, the rolling rule,
bucketed/batched/sharded scoring against unbatched single-device scoring, resume after SIGKILL, bad lines."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mistral_jax.cli import evaluate as cli  # noqa: E402
from mistral_jax.evaluation.lm_eval_tasks import TASKS_DIR  # noqa: E402
from mistral_jax.evaluation.output import EXAMPLES_FILE, SUMMARY_FILE  # noqa: E402
from mistral_jax.model import transformer as model
from mistral_jax.inference import scoring
from mistral_jax.model import sharding  # noqa: E402
from mistral_jax.model.config import ModelConfig  # noqa: E402
from mistral_jax.data.tokenizer import Tokenizer  # noqa: E402
from tests.conftest import xla_flags  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64, vocab_size=32000,
            sliding_window=16, max_seq_len=256)


def random_params(cfg: ModelConfig, seed: int):
    """Random float32 numpy params: weights N(0, 0.08), norm scales near 1 (peaked next-token distributions)."""
    import flax.linen as nn

    rs = np.random.RandomState(seed)

    def init(path, x):
        norm = "norm" in jax.tree_util.keystr(path)
        return ((1.0 if norm else 0.0) + rs.randn(*x.shape) * (0.1 if norm else 0.08)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(init, nn.unbox(model.abstract_params(cfg)))


def make_tiny(folder: Path, seed: int = 0):
    """(cfg, params, HF folder with tokenizer files, HF MistralForCausalLM float32 eager on the same weights)."""
    import torch
    from transformers import MistralForCausalLM

    from mistral_jax.checkpoint.torch_write import write_hf

    cfg = ModelConfig(**TINY)
    params = random_params(cfg, seed)
    write_hf(folder, cfg, params, progress=False)
    torch.manual_seed(0)
    hf = MistralForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    return cfg, params, folder, hf


def hf_logprobs(hf, tokens):
    """log-softmax of HF logits for the inputs tokens[:-1] at the targets tokens[1:]: (len-1,) float64."""
    import torch
    with torch.no_grad():
        lg = hf(torch.tensor([tokens[:-1]])).logits[0].double()
    lp = torch.log_softmax(lg, -1)
    return lp[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].numpy(), lg.argmax(-1).numpy()


@pytest.fixture(scope="module")
def tiny(eval_tiny):
    """make_tiny's model, built once a session (tests/conftest.py)."""
    return eval_tiny


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.for_vocab(32000)


def _doc(tok, n_min):
    """BOS + tokens of standard-library text, at least n_min tokens."""
    text = Path(json.__file__).read_text()
    ids = tok.encode(text, bos=True)
    assert len(ids) >= n_min
    return ids


def test_scores_equal_hf_long_documents_and_rolling_boundary(tiny, tok):
    cfg, params, _, hf = tiny
    doc = _doc(tok, 200)[:100]
    # one pass over a document much longer than the window (16): equals HF on the whole document
    full, _ = hf_logprobs(hf, doc)
    sc = scoring.Scorer(params, cfg, batch_size=2, max_input=128)
    one = sc.score([(doc, len(doc) - 1)])[0]
    np.testing.assert_allclose(one.logprobs, full, atol=1e-4, rtol=0)
    # rolling windows of at most 32 inputs: each window equals HF run on exactly that window's tokens
    wins = scoring.rolling_windows(len(doc), 32, 16)
    assert len(wins) > 2 and sum(w.n_score for w in wins) == len(doc) - 1
    res = sc.score([(doc[w.start:w.end], w.n_score) for w in wins])
    for w, r in zip(wins, res):
        want, _ = hf_logprobs(hf, doc[w.start:w.end])
        np.testing.assert_allclose(r.logprobs, want[-w.n_score:], atol=1e-4, rtol=0)
    # the first window is the document's own first 33 tokens: equal to the one-pass values there
    np.testing.assert_allclose(res[0].logprobs, full[:32], atol=1e-4, rtol=0)
    # later windows lose context, so their tokens differ from the one-pass values (the rule matters)
    rolled = np.concatenate([r.logprobs for r in res])
    assert np.abs(rolled - full).max() > 1e-3


def test_rolling_windows_rule():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n in (1, 2, 5, 17, 33, 34, 100):
        for max_input, overlap in ((32, 1), (32, 16), (32, 31), (8, 3), (200, 16)):
            wins = scoring.rolling_windows(n, max_input, overlap)
            scored = []
            for k, w in enumerate(wins):
                assert 1 <= w.n_score and w.end - w.start <= max_input + 1 and w.end <= n
                first = w.end - w.n_score                       # index of the first scored target
                assert k == 0 or first - w.start >= overlap     # context of the first scored token
                scored += range(first, w.end)
            assert scored == list(range(1, n)), (n, max_input, overlap)   # every token exactly once, in order
            if n - 1 <= max_input:
                assert wins == ([scoring.Window(0, n, n - 1)] if n > 1 else [])
            if overlap == 1:   # lm-evaluation-harness's rule: same inputs and predicted tokens
                toks = list(range(100, 100 + n - 1))
                seq = [0] + toks
                ours = [(seq[w.start:w.end - 1], seq[w.end - w.n_score:w.end]) for w in wins]
                theirs = [make_disjoint_window(p) for p in get_rolling_token_windows(toks, 0, max_input, 1)]
                theirs = [(list(a), list(b)) for a, b in theirs]
                # lm-eval's disjoint context drops the inputs that overlap its predictions; ours feeds them
                assert [b for _, b in ours] == [b for _, b in theirs]
                assert [a[:len(a) - len(b) + 1] for a, b in ours] == [a for a, _ in theirs]


@pytest.mark.slow
def test_batched_buckets_mesh_and_greedy_flags(tiny, tok):
    cfg, params, _, hf = tiny
    doc = _doc(tok, 300)
    rs = np.random.RandomState(0)
    reqs = []
    for n in (5, 70, 33, 12, 100, 64, 65, 2, 140):
        start = rs.randint(0, len(doc) - n)
        reqs.append((doc[start:start + n], int(rs.randint(1, n))))
    # a continuation made of HF's own greedy tokens must be flagged greedy
    ctx = doc[:20]
    _, am = hf_logprobs(hf, ctx + [0])
    greedy_seq = ctx + [int(am[-1])]
    for _ in range(3):
        _, am = hf_logprobs(hf, greedy_seq + [0])
        greedy_seq.append(int(am[-1]))
    reqs.append((greedy_seq, 4))
    scoring._score_batch.clear_cache()          # earlier tests may have compiled some of these shapes
    before = scoring._score_batch._cache_size()
    sc = scoring.Scorer(params, cfg, batch_size=3, max_input=160, pack=False)
    batched = sc.score(reqs)
    assert sc.buckets == (64, 128, 160)
    # a bucket's full batches share one program; its last, part-filled batch runs with fewer rows:
    # bucket 64 holds 7 requests (3 + 3 + 1 rows), 128 holds 2, 160 holds 1
    assert sc.used_shapes == {(3, 64), (1, 64), (2, 128), (1, 160)}
    assert scoring._score_batch._cache_size() - before == len(sc.used_shapes)
    # packed (the default): the 10 requests (505 input positions) share 4 rows of 160 as segments
    pk = scoring.Scorer(params, cfg, batch_size=3, max_input=160)
    packed = pk.score(reqs)
    assert pk.used_shapes == {(3, 160), (1, 160)}
    single = scoring.Scorer(params, cfg, batch_size=1, max_input=160, smallest_bucket=160)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = scoring.Scorer(params, cfg, batch_size=3, max_input=160, smallest_bucket=160, mesh=mesh).score(reqs)
    for (t, n), b, s, pkd in zip(reqs, batched, sharded, packed):
        alone = single.score([(t, n)])[0]
        np.testing.assert_allclose(b.logprobs, alone.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(pkd.logprobs, alone.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(pkd.greedy, alone.greedy)
        np.testing.assert_allclose(s.logprobs, alone.logprobs, atol=1e-5, rtol=0)
        want, am = hf_logprobs(hf, t)
        np.testing.assert_allclose(b.logprobs, want[-n:], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(b.greedy, am[-n:] == np.array(t[1:])[-n:])
        np.testing.assert_array_equal(s.greedy, b.greedy)
    assert batched[-1].is_greedy and not batched[0].is_greedy


def test_pack_rows_best_fit_decreasing():
    lengths = [4, 69, 32, 11, 99, 63, 64, 1, 139, 23]
    rows = scoring.pack_rows(lengths, lambda n: 160)
    assert sorted(i for r in rows for i in r) == list(range(10))
    assert all(sum(lengths[i] for i in r) <= 160 for r in rows)
    assert len(rows) == 4 == -(-sum(lengths) // 160)       # 505 positions: 4 rows is the fewest possible
    assert [[lengths[i] for i in r] for r in rows] == [[139, 11, 1], [99, 32], [69, 64, 23, 4], [63]]
    # rows of 64 for short items, of the item's bucket for longer ones; short items fill the room left
    cap = lambda n: max(64, 64 if n <= 64 else 128 if n <= 128 else 160)  # noqa: E731
    rows = scoring.pack_rows(lengths, cap)
    assert [[lengths[i] for i in r] for r in rows] == [[139, 11], [99], [69, 32, 23, 4], [64], [63, 1]]
    assert all(sum(lengths[i] for i in r) <= cap(lengths[r[0]]) for r in rows)
    with pytest.raises(ValueError, match="length 161 of item 1 is not in"):
        scoring.pack_rows([3, 161], lambda n: 160)


def test_short_requests_fill_the_empty_rows_of_a_partial_batch():
    """Three rows of 160 run as a batch of 4 (`rows_for`): the short requests go into the fourth row, which
    runs anyway, instead of opening rows (and a program) of their own; the values do not change."""
    cfg = ModelConfig(**TINY)
    params = random_params(cfg, 0)
    rs = np.random.RandomState(3)
    reqs = [(list(rs.randint(1, 32000, n + 1)), 5) for n in (150, 149, 148, 30, 30, 30, 30, 30)]
    sc = scoring.Scorer(params, cfg, batch_size=4, max_input=160, pack_length=64)
    got = sc.score(reqs)
    assert sc.used_shapes == {(4, 160)} and sc.positions_run == 640
    alone = scoring.Scorer(params, cfg, batch_size=1, max_input=160, pack=False)
    for r, g in zip(reqs, got):
        np.testing.assert_allclose(g.logprobs, alone.score([r])[0].logprobs, atol=1e-5, rtol=0)


def test_head_runs_at_scored_positions_only(monkeypatch):
    """The output head runs on the scored positions gathered together, not on the chunks of each row that
    hold one: 20 scored positions in two rows make 2 chunks of 16 (3 if taken row by row)."""
    cfg = ModelConfig(**TINY)
    params = random_params(cfg, 0)
    rs = np.random.RandomState(4)
    reqs = [(list(rs.randint(1, 32000, 151)), 12), (list(rs.randint(1, 32000, 101)), 8)]
    want = scoring.Scorer(params, cfg, batch_size=2, max_input=160, pack=False, chunk=512).score(reqs)
    runs, chunk_scores = [], scoring._chunk_scores

    def counted(h, w, t):
        jax.debug.callback(lambda: runs.append(1))
        return chunk_scores(h, w, t)

    monkeypatch.setattr(scoring, "_chunk_scores", counted)
    scoring._score_batch.clear_cache()
    try:
        got = scoring.Scorer(params, cfg, batch_size=2, max_input=160, pack=False, chunk=16).score(reqs)
        jax.effects_barrier()
    finally:
        scoring._score_batch.clear_cache()
    assert len(runs) == 2
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(g.greedy, w.greedy)


def test_wilson_interval():
    lo, hi = scoring.wilson_interval(8, 10)          # textbook value: 0.4902 .. 0.9433
    assert abs(lo - 0.4902) < 1e-4 and abs(hi - 0.9433) < 1e-4
    lo, hi = scoring.wilson_interval(0, 20)
    assert lo == 0.0 and abs(hi - 0.1611) < 1e-4


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_choice_cli_equals_hf_and_reports_bad_lines(tiny, tok, tmp_path, capsys):
    cfg, params, folder, hf = tiny
    zen = [json.loads(x) for x in (TASKS_DIR / "zen_choice.jsonl").read_text().splitlines()][:6]
    bad = ["{not json", {"context": "a", "choices": ["x", "y"], "label": 2}, {"context": "a", "choices": [],
           "label": 0}, {"context": "word " * 300, "choices": ["x"], "label": 0}]
    data = _write_jsonl(tmp_path / "choice.jsonl", zen[:3] + bad + zen[3:])
    rc = cli.main(["--checkpoint", str(folder), "--task", "choice", "--data", str(data), "--output",
                   str(tmp_path / "out"), "--batch-size", "4"])
    assert rc == 1
    printed = capsys.readouterr().out
    rows = {r["line"]: r for r in map(json.loads, (tmp_path / "out/examples.jsonl").read_text().splitlines())}
    assert sorted(rows) == list(range(1, 11))
    assert f"{data}:4: not valid JSON" in rows[4]["error"]
    assert f"{data}:5: 'label' must be an integer in [0, 2), got 2" in rows[5]["error"]
    assert f"{data}:6: 'choices' must be a non-empty list" in rows[6]["error"]
    assert f"{data}:7:" in rows[7]["error"] and "longer than the evaluation context" in rows[7]["error"]
    good = [rows[n] for n in (1, 2, 3, 8, 9, 10)]
    correct = n_scored = n_run = 0
    for ex, row in zip(zen, good):
        lls = []
        for c in ex["choices"]:
            ctx = tok.encode(ex["context"], bos=True)
            whole = tok.encode(ex["context"] + " " + c, bos=True)
            lp, _ = hf_logprobs(hf, whole)
            lls.append(lp[len(ctx) - 1:].sum())
            n_scored, n_run = n_scored + len(whole) - len(ctx), n_run + len(whole) - 1
        np.testing.assert_allclose(row["loglik"], lls, atol=1e-4, rtol=0)
        assert row["pred"] == int(np.argmax(lls)) and row["label"] == ex["label"]
        correct += int(np.argmax(lls)) == ex["label"]
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["errors"] == 4 and summary["scored"] == 6
    assert summary["acc"]["correct"] == correct and summary["acc"]["ci95"] == list(scoring.wilson_interval(correct, 6))
    # tokens scored (the choices' continuation tokens) vs run (BOS + context + choice, per choice; no padding)
    assert (summary["tokens_scored"], summary["tokens_run"]) == (n_scored, n_run) and n_run > 2 * n_scored
    assert summary["this_run"]["tokens"] == n_run and "tokens_run" in summary["token_counts"]
    # stdout: the headline metrics only (progress, counts and errors go to stderr)
    lo, hi = summary["acc"]["ci95"]
    assert printed.splitlines() == [
        f"acc:      {correct / 6:.4f} ({correct} of 6), 95% Wilson interval [{lo:.4f}, {hi:.4f}]",
        f"acc_norm: {summary['acc_norm']['value']:.4f} ({summary['acc_norm']['correct']} of 6), 95% Wilson "
        "interval [{:.4f}, {:.4f}]".format(*summary["acc_norm"]["ci95"]), f"chance:   {summary['chance']:.4f}"]
    # --pack-length 0: one request per bucket row, the same log-likelihoods as the packed rows above
    assert cli.main(["--checkpoint", str(folder), "--task", "choice", "--data", str(data), "--output",
                     str(tmp_path / "unpacked"), "--batch-size", "4", "--pack-length", "0"]) == 1
    unpacked = {r["line"]: r for r in map(json.loads, (tmp_path / "unpacked/examples.jsonl").read_text().splitlines())}
    for n in (1, 2, 3, 8, 9, 10):
        np.testing.assert_allclose(unpacked[n]["loglik"], rows[n]["loglik"], atol=1e-5, rtol=0)
    runs = [json.loads((tmp_path / d / "summary.json").read_text())["this_run"] for d in ("out", "unpacked")]
    # 24 short requests (at most 64 positions): packed into 6 rows of 64 (rows of 256 would waste positions)
    # against one 64-position row each
    assert runs[0]["buckets"] == runs[1]["buckets"] == [64]
    assert runs[0]["positions_run"] * 2 < runs[1]["positions_run"]


@pytest.mark.slow
def test_perplexity_cli_resumes_after_sigkill(tiny, tok, tmp_path):
    cfg, params, folder, hf = tiny
    words = Path(json.__file__).read_text().split() * 4
    docs = [{"text": " ".join(words[i:i + 3 + i % 7])} for i in range(0, 1800, 3)]
    data = _write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "out"
    argv = ["--checkpoint", str(folder), "--task", "perplexity", "--data", str(data), "--output", str(out),
            "--batch-size", "1", "--max-length", "64"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(None), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "infer.evaluate", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ex_file = out / EXAMPLES_FILE
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if ex_file.exists() and ex_file.stat().st_size > 2000:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    lines_before = ex_file.read_bytes().count(b"\n")
    assert 0 < lines_before < len(docs), "the run should have been killed part way"
    with open(ex_file, "ab") as f:      # a row torn by the kill (whether or not this kill tore one)
        f.write(b'{"key": "' + str(data).encode() + b':9999", "nll"')
    assert cli.main(argv[:-3] + ["8", "--max-length", "64"]) == 0           # batch size may change
    rows = [json.loads(x) for x in ex_file.read_text().splitlines()]
    assert sorted(r["line"] for r in rows) == list(range(1, len(docs) + 1))    # each example exactly once
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["this_run"]["skipped_already_scored"] == lines_before
    assert summary["tokens"] == sum(len(tok.encode(d["text"])) for d in docs)
    # spot check against HF: a document scored by the killed run and one scored by the rerun
    for r in (rows[0], rows[-1]):
        ids = tok.encode(docs[r["line"] - 1]["text"], bos=True)
        lp, _ = hf_logprobs(hf, ids)
        assert abs(r["nll"] + lp.sum()) < 1e-3
        assert abs(r["bits_per_byte"] - (-lp.sum()) / np.log(2) / len(docs[r["line"] - 1]["text"].encode())) < 1e-6
    # a rerun with a different setting is refused, naming it
    assert cli.main(argv[:-1] + ["32"]) == 2

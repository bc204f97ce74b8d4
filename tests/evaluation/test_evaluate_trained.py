"""`python -m infer.evaluate` on a tiny model trained in the test: a learnable choice task and a separable
moderation task score far above chance and at chance with shuffled labels; --safe-prompt puts exactly the
paper's guardrail prompt into the chat encoding (checked against mistral-common); few-shot prefixes."""

import functools
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mistral_jax.cli import evaluate as cli
from mistral_jax.evaluation.encoding import encode_pair
from mistral_jax.evaluation.examples import MODERATION_LABELS
from mistral_jax.evaluation.output import EXAMPLES_FILE, SUMMARY_FILE
from mistral_jax.model import transformer as model_lib
from mistral_jax.evaluation import prompts
from mistral_jax.inference import scoring
from mistral_jax.checkpoint.native import save_params
from mistral_jax.model.config import ModelConfig
from mistral_jax.data.tokenizer import Tokenizer
from tests.conftest import FAST_RUN

pytestmark = pytest.mark.slow     # the model is trained for STEPS steps first, ~30 s

# The paper's guardrail system prompt (section 5), written out here so that the preset file is checked too.
PAPER_GUARDRAIL = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid "
                   "harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and "
                   "positivity.")
CFG = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64, vocab_size=32000,
                  max_seq_len=192)
RED = "apple cherry tomato strawberry ruby blood rose lobster brick flame cardinal radish".split()
BLUE = "sky ocean sapphire lake river wave whale glacier denim ink dolphin lagoon".split()
CALM = "garden music bread morning tea library bicycle picnic candle blanket lemon violin".split()
HARSH = "weapon steal poison threat attack smuggle bomb fraud insult revenge explosive hostage".split()
STEPS = 100
# 96 training texts: with 32, held-out recall ranged 0.71-1.0 with the CPU's vector width alone (AVX-512,
# AVX2, SSE4.2 on one Intel Xeon, via --xla_cpu_max_isa); with 96 every run over 3 seeds x 3 widths was
# 48/48 with the right label ahead by >= 4.5 nats.
N_MODERATE_TRAIN = 96


def choice_rows():
    rows = []
    for i, w in enumerate(RED + BLUE):
        answer, other = ("red", "blue") if w in RED else ("blue", "red")
        label = i % 2
        choices = [answer, other] if label == 0 else [other, answer]
        rows.append({"id": w, "context": f"The colour of {w} is", "choices": choices, "label": label})
    return rows


def moderate_rows(seed, n, exclude=frozenset()):
    """n rows alternating acceptable/unacceptable, 4 words drawn from one list; texts in `exclude` skipped."""
    rs = random.Random(seed)
    rows = []
    while len(rows) < n:
        bad = len(rows) % 2 == 1
        text = " ".join(rs.sample(HARSH if bad else CALM, 4))
        if text not in exclude:
            rows.append({"text": text, "label": "unacceptable" if bad else "acceptable"})
    return rows


def held_out_moderate_rows():
    """48 rows whose texts never occur in the training rows."""
    return moderate_rows(7, 48, exclude={r["text"] for r in moderate_rows(0, N_MODERATE_TRAIN)})


def shuffled(rows, seed):
    labels = [r["label"] for r in rows]
    random.Random(seed).shuffle(labels)
    return [{**r, "label": lb} for r, lb in zip(rows, labels)]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def training_sequences(tok, template):
    """Two groups (choice, moderate) of (ids, n_answer): the requests infer.evaluate scores, correct answers."""
    choice, moderate = [], []
    for row in choice_rows():
        ctx, cont = encode_pair(tok, row["context"], " " + row["choices"][row["label"]])
        choice.append((ctx + cont, len(cont)))
    for row in moderate_rows(0, N_MODERATE_TRAIN):
        ctx, cont = encode_pair(tok, prompts.fill_template(template, row["text"]), " " + row["label"])
        moderate.append((ctx + cont, len(cont)))
    return choice, moderate


def _arrays(seqs):
    """tokens (B, T), input positions predicting each answer token (B, K), answer tokens (B, K), weights (B, K)."""
    T, K = max(len(s) for s, _ in seqs), max(n for _, n in seqs)
    tokens = np.zeros((len(seqs), T), np.int32)
    pos, tgt, w = np.zeros((len(seqs), K), np.int32), np.zeros((len(seqs), K), np.int32), np.zeros((len(seqs), K))
    for r, (s, n) in enumerate(seqs):
        tokens[r, :len(s)] = s
        pos[r, :n] = np.arange(len(s) - n - 1, len(s) - 1)
        tgt[r, :n] = s[len(s) - n:]
        w[r, :n] = 1.0
    return tokens, pos, tgt, w.astype(np.float32)


def train(groups):
    """Adam on the mean NLL of the answer tokens only (logits computed only at those positions); each group
    is padded to its own length."""
    net = model_lib.Transformer(CFG)
    params = model_lib.init_params(CFG, jax.random.PRNGKey(0))
    opt = optax.adam(2e-2)
    batches = [_arrays(g) for g in groups]

    def loss_fn(p):
        total = 0.0
        for tokens_BT, pos_BK, tgt_BK, w_BK in batches:
            h_BTD, _ = net.apply({"params": p}, tokens_BT, return_hidden=True)
            logits_BKV = jnp.take_along_axis(h_BTD, pos_BK[..., None], axis=1) @ p["output"]
            lp_BK = jnp.take_along_axis(jax.nn.log_softmax(logits_BKV), tgt_BK[..., None], axis=-1)[..., 0]
            total += -jnp.sum(lp_BK * w_BK) / w_BK.sum()
        return total

    @functools.partial(jax.jit, compiler_options=FAST_RUN)      # it runs STEPS times
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, o = opt.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    o = opt.init(params)
    for _ in range(STEPS):
        params, o, loss = step(params, o)
    assert float(loss) < 0.1, f"the tiny model did not learn the training answers (loss {float(loss):.3f})"
    return jax.device_get(params)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tok = Tokenizer.for_vocab(CFG.vocab_size)
    params = train(training_sequences(tok, prompts.load_template(prompts.MODERATE)))
    ckpt = tmp_path_factory.mktemp("trained") / "ckpt"
    save_params(ckpt, CFG, params)
    return ckpt, tok


def run_cli(ckpt, task, data, out, *extra):
    rc = cli.main(["--checkpoint", str(ckpt), "--task", task, "--data", str(data), "--output", str(out),
                   "--batch-size", "16", *extra])
    summary = json.loads((out / SUMMARY_FILE).read_text())
    rows = {r["line"]: r for r in map(json.loads, (out / EXAMPLES_FILE).read_text().splitlines())}
    return rc, summary, rows


def test_choice_trained_above_chance_and_shuffled_at_chance(trained, tmp_path):
    ckpt, _ = trained
    rows = choice_rows()
    rc, s, _ = run_cli(ckpt, "choice", write_jsonl(tmp_path / "c.jsonl", rows), tmp_path / "c")
    assert rc == 0 and s["scored"] == len(rows) == 24 and s["chance"] == 0.5
    assert s["acc"]["value"] >= 0.9 and s["acc"]["ci95"][0] > 0.5      # far above chance: the interval excludes it
    sh = shuffled(rows, 1)
    assert 0.3 < np.mean([a["label"] == b["label"] for a, b in zip(rows, sh)]) < 0.7
    rc, s, _ = run_cli(ckpt, "choice", write_jsonl(tmp_path / "cs.jsonl", sh), tmp_path / "cs")
    lo, hi = s["acc"]["ci95"]
    assert rc == 0 and lo <= 0.5 <= hi


def test_moderate_trained_precision_recall_and_shuffled(trained, tmp_path, capsys):
    ckpt, tok = trained
    held_out = held_out_moderate_rows()               # new combinations of the two word lists
    bad = ["{oops", {"text": "garden tea", "label": "maybe"}, {"label": "acceptable"}, {"text": "", "label":
           "acceptable"}]
    data = write_jsonl(tmp_path / "m.jsonl", held_out[:10] + bad + held_out[10:])
    rc, s, rows = run_cli(ckpt, "moderate", data, tmp_path / "m")
    assert rc == 1 and s["errors"] == 4 and s["scored"] == 48 and s["positive_class"] == "unacceptable"
    assert f"{data}:11: not valid JSON" in rows[11]["error"]
    assert f"{data}:12: 'label' must be one of 'acceptable', 'unacceptable', got 'maybe'" in rows[12]["error"]
    assert f"{data}:13: 'text' must be a non-empty string" in rows[13]["error"]
    assert f"{data}:14: 'text' must be a non-empty string" in rows[14]["error"]
    # what the code guarantees: the confusion counts, rates and Wilson intervals follow from the rows
    check_moderation_summary(s, rows)
    # the label words' tokens are scored; the prompt runs once per label word (BOS + template + text + word)
    template = prompts.load_template(prompts.MODERATE)
    text_of = {n: r["text"] for n, r in zip([*range(1, 11), *range(15, 53)], held_out)}    # line -> text
    for r in (r for r in rows.values() if "error" not in r):
        prompt = prompts.fill_template(template, text_of[r["line"]])
        pairs = [encode_pair(tok, prompt, " " + w) for w in MODERATION_LABELS]
        assert r["n_tokens"] == {w: len(c) for w, (_, c) in zip(MODERATION_LABELS, pairs)}, r
        assert r["n_tokens_run"] == sum(len(a) + len(c) - 1 for a, c in pairs), r
    assert s["tokens_scored"] == sum(sum(r["n_tokens"].values()) for r in rows.values() if "error" not in r)
    lines = capsys.readouterr().out.splitlines()        # stdout: precision, recall, accuracy with intervals
    assert [ln.split(":")[0] for ln in lines] == ["precision", "recall", "accuracy"], lines
    assert lines[1] == "recall:    {:.4f} ({} of {}), 95% Wilson interval [{:.4f}, {:.4f}]".format(
        s["recall"]["value"], s["recall"]["correct"], s["recall"]["n"], *s["recall"]["ci95"])
    c = s["confusion"]
    assert c["tp"] + c["fn"] == 24 and c["fp"] + c["tn"] == 24
    # the trained model's quality: measured 48/48 on every seed and vector width tried (see N_MODERATE_TRAIN);
    # 0.9 leaves room for 2 misses of 24 positives and the interval still excludes chance
    for k in ("precision", "recall", "accuracy"):
        assert s[k]["value"] >= 0.9 and s[k]["ci95"][0] > 0.5, (k, s[k])
    # labels drawn at random, independent of the text (about 1/3 positive): precision at the positive rate,
    # recall and accuracy at 1/2 (the model still calls half of the texts unacceptable)
    rs = random.Random(3)
    sh = [{**r, "label": "unacceptable" if rs.random() < 0.35 else "acceptable"} for r in held_out]
    rc, s, rows = run_cli(ckpt, "moderate", write_jsonl(tmp_path / "ms.jsonl", sh), tmp_path / "ms")
    assert rc == 0
    tp, fp, fn, _ = check_moderation_summary(s, rows)
    assert tp + fp != tp + fn and s["positive_rate"] == (tp + fn) / 48
    for k, chance in (("precision", s["positive_rate"]), ("recall", 0.5), ("accuracy", 0.5)):
        lo, hi = s[k]["ci95"]
        assert lo <= chance <= hi, (k, chance, s[k])


def check_moderation_summary(s, rows):
    """Asserts the summary's confusion counts, rates and intervals from the scored rows; returns tp, fp, fn, tn."""
    scored = [r for r in rows.values() if "error" not in r]
    for r in scored:
        ll = r["loglik"]
        assert r["pred"] == ("unacceptable" if ll["unacceptable"] > ll["acceptable"] else "acceptable"), r
    pairs = [(r["label"], r["pred"]) for r in scored]
    pos, neg = "unacceptable", "acceptable"
    tp, fp, fn, tn = (pairs.count(x) for x in ((pos, pos), (neg, pos), (pos, neg), (neg, neg)))
    assert s["confusion"] == {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
    for k, (correct, n) in (("precision", (tp, tp + fp)), ("recall", (tp, tp + fn)),
                            ("accuracy", (tp + tn, len(scored)))):
        assert (s[k]["correct"], s[k]["n"]) == (correct, n), (k, s[k])
        assert s[k]["value"] == pytest.approx(correct / n) and s[k]["ci95"] == pytest.approx(
            list(scoring.wilson_interval(correct, n))), (k, s[k])
    return tp, fp, fn, tn


def _mc_chat(messages):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    req = ChatCompletionRequest(messages=[cls[r](content=c) for r, c in messages])
    return list(MistralTokenizer.v1().encode_chat_completion(req).tokens)


def test_safe_prompt_chat_encoding_equals_mistral_common(trained, tmp_path, monkeypatch):
    from mistral_jax.inference import decode

    ckpt, tok = trained
    assert prompts.load_prompt(prompts.GUARDRAIL) == PAPER_GUARDRAIL
    seen = []
    real_generate = decode.generate

    def spy(params, cfg, prompt_ids, *a, **k):
        seen.extend(map(list, prompt_ids))
        return real_generate(params, cfg, prompt_ids, *a, **k)
    monkeypatch.setattr(decode, "generate", spy)
    data = write_jsonl(tmp_path / "g.jsonl", [
        {"prompt": "How do I bake bread?"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "Name a colour."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}])
    rc, _, rows = run_cli(ckpt, "generate", data, tmp_path / "g", "--safe-prompt", "--max-new-tokens", "2")
    assert rc == 1 and "starts with a system message and a system prompt was given" in rows[3]["error"]
    want = [_mc_chat([("system", PAPER_GUARDRAIL), ("user", "How do I bake bread?")]),
            _mc_chat([("system", PAPER_GUARDRAIL), ("user", "Hi"), ("assistant", "Hello."),
                      ("user", "Name a colour.")])]
    assert sorted(seen) == sorted(want)
    assert [rows[i]["n_prompt_tokens"] for i in (1, 2)] == [len(w) for w in want]
    # moderate --safe-prompt: the filled template is the user turn, the label word starts the answer
    seen_req = []
    real_score = scoring.Scorer.score

    def score_spy(self, requests, *a, **k):
        seen_req.extend((list(t), n) for t, n in requests)
        return real_score(self, requests, *a, **k)
    monkeypatch.setattr(scoring.Scorer, "score", score_spy)
    text = "garden tea lemon picnic"
    rc, _, _ = run_cli(ckpt, "moderate", write_jsonl(tmp_path / "m.jsonl", [{"text": text, "label": "acceptable"}]),
                       tmp_path / "m", "--safe-prompt")
    ctx = _mc_chat([("system", PAPER_GUARDRAIL),
                    ("user", prompts.fill_template(prompts.load_template(prompts.MODERATE), text))])
    assert rc == 0 and seen_req == [(ctx + tok.encode(w), len(tok.encode(w))) for w in MODERATION_LABELS]


def test_fewshot_prefix_determinism_and_exclusion(trained, tmp_path, monkeypatch):
    ckpt, tok = trained
    seen = []
    real_score = scoring.Scorer.score

    def score_spy(self, requests, *a, **k):
        seen.append([(list(t), n) for t, n in requests])
        return real_score(self, requests, *a, **k)
    monkeypatch.setattr(scoring.Scorer, "score", score_spy)
    rows = choice_rows()[:8]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    rc, s, out = run_cli(ckpt, "choice", data, tmp_path / "a", "--num-fewshot", "3")
    assert rc == 0
    shots = {ln: r["fewshot"] for ln, r in out.items()}
    for ln, keys in shots.items():
        assert len(keys) == 3 == len(set(keys)) and f"{data}:{ln}" not in keys      # never the example itself
    assert len({tuple(k) for k in shots.values()}) > 1                               # drawn per example
    # the prefix: shots (context + delimiter + labelled choice) and the context joined by a blank line
    reqs = iter(seen[-1])
    for ln, row in enumerate(rows, 1):
        parts = [rows[int(k.rsplit(":", 1)[1]) - 1] for k in shots[ln]]
        ctx = "\n\n".join([f"{p['context']} {p['choices'][p['label']]}" for p in parts] + [row["context"]])
        for c in row["choices"]:
            a, b = encode_pair(tok, ctx, " " + c)
            assert next(reqs) == (a + b, len(b))
    # deterministic: another batch size and a resumed half give the same shots; another seed differs
    rc, _, out2 = run_cli(ckpt, "choice", data, tmp_path / "b", "--num-fewshot", "3", "--batch-size", "3")
    assert {ln: r["fewshot"] for ln, r in out2.items()} == shots
    rc, _, out3 = run_cli(ckpt, "choice", data, tmp_path / "c", "--num-fewshot", "3", "--fewshot-seed", "7")
    assert {ln: r["fewshot"] for ln, r in out3.items()} != shots
    # a separate few-shot file: shots come from it (the example itself may not be excluded there)
    pool = write_jsonl(tmp_path / "pool.jsonl", choice_rows()[8:12])
    rc, _, out4 = run_cli(ckpt, "choice", data, tmp_path / "d", "--num-fewshot", "4", "--fewshot-data", str(pool))
    assert rc == 0 and all(sorted(r["fewshot"]) == [f"{pool}:{i}" for i in range(1, 5)] for r in out4.values())
    assert cli.main(["--checkpoint", str(ckpt), "--task", "choice", "--data", str(data), "--output",
                     str(tmp_path / "e"), "--num-fewshot", "8"]) == 2            # 7 others: too few
    # generate, chat: shots become user/assistant turns after the system prompt
    from mistral_jax.inference import decode
    seen_g = []
    real_generate = decode.generate

    def spy(params, cfg, prompt_ids, *a, **k):
        seen_g.extend(map(list, prompt_ids))
        return real_generate(params, cfg, prompt_ids, *a, **k)
    monkeypatch.setattr(decode, "generate", spy)
    g = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "2+2?", "target": "4"}, {"prompt": "3+3?", "target": "6"}])
    rc, _, _ = run_cli(ckpt, "generate", g, tmp_path / "g", "--num-fewshot", "1", "--system-prompt", "Be exact.",
                       "--max-new-tokens", "1")
    assert rc == 0 and sorted(seen_g) == sorted([
        _mc_chat([("system", "Be exact."), ("user", "3+3?"), ("assistant", "6"), ("user", "2+2?")]),
        _mc_chat([("system", "Be exact."), ("user", "2+2?"), ("assistant", "4"), ("user", "3+3?")])])

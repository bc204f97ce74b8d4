"""summary.json's token counts (scored vs run), the headline lines `infer.evaluate` prints on stdout, and the
one-line JSONL example of each task's input format (the README's list) read and accepted as the CLI reads it."""

import json

import pytest

from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.evaluation import likelihood_tasks
from mistral_jax.evaluation.encoding import Settings, encode_prompt
from mistral_jax.evaluation.examples import check_target, read_examples
from mistral_jax.evaluation.summary import TOKEN_COUNTS, headline, summarize
from mistral_jax.inference.scoring import wilson_interval


def _choice_row(key, correct, n_tokens, n_run):
    return {"key": key, "label": 0, "loglik": [-1.0, -2.0], "n_tokens": n_tokens, "n_tokens_run": n_run,
            "correct": correct, "correct_norm": not correct}


def test_token_counts_scored_and_run_with_their_explanation():
    rows = [_choice_row("a", True, [2, 3], 12), _choice_row("b", False, [1, 1], 8), {"key": "c", "error": "x"}]
    s = summarize("choice", rows)
    assert (s["tokens_scored"], s["tokens_run"]) == (7, 20) and s["token_counts"].startswith(TOKEN_COUNTS["choice"])
    assert "this_run.tokens: the tokens_run" in s["token_counts"]
    ppl = [{"key": "a", "n_tokens": 10, "n_bytes": 40, "nll": 20.0, "n_tokens_run": 12},
           {"key": "b", "n_tokens": 5, "n_bytes": 20, "nll": 10.0, "n_tokens_run": 5}]
    s = summarize("perplexity", ppl)
    assert s["tokens_scored"] == s["tokens"] == 15 and s["tokens_run"] == 17
    del ppl[1]["n_tokens_run"]                   # a row written before rows counted their inputs
    assert summarize("perplexity", ppl)["tokens_run"] is None
    mod = {"key": "a", "label": "unacceptable", "pred": "acceptable", "correct": False,
           "n_tokens": {"acceptable": 2, "unacceptable": 3}, "n_tokens_run": 30}
    s = summarize("moderate", [mod])
    assert (s["tokens_scored"], s["tokens_run"]) == (5, 30)
    for task, line in TOKEN_COUNTS.items():
        assert "\n" not in line and "tokens_scored:" in line and "tokens_run:" in line, task
    assert "tokens_scored" not in summarize("generate", [{"key": "a", "n_completion_tokens": 3}])


def test_headline_of_each_task():
    rows = [_choice_row("a", True, [2, 3], 12), _choice_row("b", False, [1, 1], 8)]
    lo, hi = wilson_interval(1, 2)
    assert headline(summarize("choice", rows)) == [
        f"acc:      0.5000 (1 of 2), 95% Wilson interval [{lo:.4f}, {hi:.4f}]",
        f"acc_norm: 0.5000 (1 of 2), 95% Wilson interval [{lo:.4f}, {hi:.4f}]",
        "chance:   0.5000"]
    ppl = [{"key": "a", "n_tokens": 10, "n_bytes": 40, "nll": 20.0, "n_tokens_run": 12}]
    assert headline(summarize("perplexity", ppl)) == ["perplexity:    7.3891", "bits_per_byte: 0.7213",
                                                      "tokens_scored: 10 (tokens_run 12)"]
    mod = [{"key": k, "label": lab, "pred": pred, "correct": lab == pred, "n_tokens": {}, "n_tokens_run": 1}
           for k, lab, pred in (("a", "unacceptable", "unacceptable"), ("b", "acceptable", "unacceptable"),
                                ("c", "unacceptable", "acceptable"), ("d", "acceptable", "acceptable"))]
    lines = headline(summarize("moderate", mod))
    assert [ln.split(":")[0] for ln in lines] == ["precision", "recall", "accuracy"]
    assert lines[0].startswith("precision: 0.5000 (1 of 2), 95% Wilson interval [")
    assert lines[2].startswith("accuracy:  0.5000 (2 of 4), 95% Wilson interval [")
    assert headline(summarize("moderate", mod[3:]))[:2] == ["precision: n/a (0 of 0)", "recall:    n/a (0 of 0)"]
    gen = [{"key": "a", "n_completion_tokens": 3, "exact_match": True},
           {"key": "b", "n_completion_tokens": 3, "exact_match": False}, {"key": "c", "n_completion_tokens": 1}]
    assert headline(summarize("generate", gen)) == [
        f"exact_match: 0.5000 (1 of 2), 95% Wilson interval [{lo:.4f}, {hi:.4f}]"]
    assert headline(summarize("generate", gen[2:])) == ['exact_match: n/a (no example has a "target")']


# the README's list of input formats: each task's one-line example, exactly as printed there
FORMATS = {
    "perplexity": '{"text": "Beautiful is better than ugly. Explicit is better than implicit.", "id": "zen-1"}',
    "choice": '{"context": "The Zen of Python: Beautiful is", "choices": ["better than ugly.", "worse than ugly."], '
              '"label": 0}',
    "generate": '{"prompt": "Q: What is 2 + 2?\\nA:", "target": "4"}',
    "generate-chat": '{"messages": [{"role": "user", "content": "Say hello."}], "target": "Hello."}',
    "moderate": '{"text": "How do I bake bread at home?", "label": "acceptable"}',
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.for_vocab(32000)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_the_one_line_example_of_each_task_format_is_accepted(name, tok, tmp_path):
    task = name.split("-")[0]
    path = tmp_path / "data.jsonl"
    path.write_text(FORMATS[name] + "\n")
    [ex] = read_examples([path], task)
    assert ex.error is None and ex.line == 1 and ex.obj == json.loads(FORMATS[name])
    st = Settings(max_input=256, overlap=64, moderation_template="Is this acceptable? {text}\nAnswer:")
    if task == "generate":
        assert len(encode_prompt(ex.obj, tok, st)) > 3
        check_target(ex.obj)
    else:       # what the scoring tasks do with an example before the model runs
        prepare = getattr(likelihood_tasks, f"_prepare_{task}")
        _, requests = prepare(ex, tok, st, 32000)
        assert requests and all(0 < n < len(ids) for ids, n in requests)

"""Task metrics over an evaluation's output rows (summary.json), and the one exact-match rule.

- perplexity: overall token NLL, perplexity exp(mean NLL) and bits per byte (summed NLL / ln 2 / UTF-8
  bytes), from the sums over documents (token-weighted).
- choice: accuracy of argmax summed log-likelihood and of argmax log-likelihood per UTF-8 byte, with 95%
  Wilson score intervals, and the chance rate.
- generate: exact match (`exact_match`) over the examples with a target, with a 95% Wilson interval.
- moderate: "unacceptable" is the positive class: precision = TP / (TP + FP), recall = TP / (TP + FN),
  accuracy, each with a 95% Wilson interval.

Token counts of the log-likelihood tasks (summary keys; `token_counts` repeats this in one line):
- tokens_scored: the tokens whose log-probability is counted (perplexity: every token after BOS, the
  denominator of perplexity and bits per byte, also under its old key `tokens`; choice: the continuation
  tokens, delimiter + choice, of every choice; moderate: those of both label words);
- tokens_run: the input positions run through the model for those examples: BOS, context, few-shot shots,
  the context again for every choice, the overlap of later rolling windows; padding excluded. None when a
  row written by an older version lacks its count;
- this_run.tokens: the tokens_run of the examples scored by this run (tokens_per_s is over them; generate:
  prompt and completion tokens); this_run.positions_run: the positions of every batch run, padding included.

`headline` renders the metrics people look at first (what `infer.evaluate` prints on stdout).
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

import numpy as np

from mistral_jax.evaluation.examples import MODERATION_LABELS
from mistral_jax.inference.scoring import wilson_interval

INTERVAL = "Wilson score, 95%"
TOKEN_COUNTS = {
    "perplexity": "tokens_scored: tokens whose log-probability is counted (every token after BOS; the perplexity "
                  "and bits-per-byte denominator, = tokens); tokens_run: input positions run through the model "
                  "(BOS and later windows' overlap included, padding excluded)",
    "choice": "tokens_scored: continuation tokens (delimiter + choice) whose log-probabilities are summed, every "
              "choice; tokens_run: input positions run through the model (BOS, shots and the context once per "
              "choice included, padding excluded)",
    "moderate": "tokens_scored: label-word tokens whose log-probabilities are summed, both words; tokens_run: "
                "input positions run through the model (BOS and the prompt once per label word included, padding "
                "excluded)",
}
_THIS_RUN = ("; this_run.tokens: the tokens_run of the examples this run scored (tokens_per_s is over them), "
             "this_run.positions_run: with the padding")


def exact_match(answer: str, reference: str) -> bool:
    """Whether a generated answer equals the reference, ignoring surrounding whitespace (the v2/v3 chat
    encoders drop an answer's trailing spaces)."""
    return answer.strip() == reference.strip()


def rate(k: int, n: int) -> dict[str, Any]:
    """k of n with its 95% Wilson interval: {"value", "correct", "n", "ci95"} (value None when n is 0)."""
    lo, hi = wilson_interval(k, n)
    return {"value": k / n if n else None, "correct": k, "n": n, "ci95": [lo, hi]}


def summarize(task: str, rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Task metrics over the output rows (rows with an 'error' are counted, not scored)."""
    rows = list(rows)
    ok = [r for r in rows if "error" not in r]
    s: dict[str, Any] = {"task": task, "examples": len(rows), "scored": len(ok), "errors": len(rows) - len(ok)}
    s.update({"perplexity": _perplexity, "choice": _choice, "moderate": _moderate, "generate": _generate}[task](ok))
    if task in TOKEN_COUNTS:
        s.update(_token_counts(task, ok))
    return s


def _token_counts(task: str, ok: list[dict[str, Any]]) -> dict[str, Any]:
    """tokens_scored and tokens_run over the scored rows (see the module docstring) and their explanation."""
    def scored(r: dict[str, Any]) -> int | None:
        n = r.get("n_tokens")
        return sum(n.values()) if isinstance(n, dict) else sum(n) if isinstance(n, list) else n
    per_row = [scored(r) for r in ok]
    run = [r.get("n_tokens_run") for r in ok]
    return {"tokens_scored": None if None in per_row else sum(per_row),
            "tokens_run": None if None in run else sum(run), "token_counts": TOKEN_COUNTS[task] + _THIS_RUN}


def _perplexity(ok: list[dict[str, Any]]) -> dict[str, Any]:
    n_tok = sum(r["n_tokens"] for r in ok)
    n_bytes = sum(r["n_bytes"] for r in ok)
    nll = sum(r["nll"] for r in ok)
    return dict(tokens=n_tok, bytes=n_bytes, nll=nll,
                token_nll=nll / n_tok if n_tok else None,
                perplexity=math.exp(nll / n_tok) if n_tok else None,
                bits_per_byte=nll / math.log(2) / n_bytes if n_bytes else None)


def _choice(ok: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(interval=INTERVAL, acc=rate(sum(r["correct"] for r in ok), len(ok)),
                acc_norm=rate(sum(r["correct_norm"] for r in ok), len(ok)),
                chance=float(np.mean([1 / len(r["loglik"]) for r in ok])) if ok else None)


def _moderate(ok: list[dict[str, Any]]) -> dict[str, Any]:
    neg, pos = MODERATION_LABELS
    tp = sum(r["label"] == pos and r["pred"] == pos for r in ok)
    fp = sum(r["label"] == neg and r["pred"] == pos for r in ok)
    fn = sum(r["label"] == pos and r["pred"] == neg for r in ok)
    return dict(interval=INTERVAL, positive_class=pos,
                confusion={"tp": tp, "fp": fp, "fn": fn, "tn": len(ok) - tp - fp - fn},
                precision=rate(tp, tp + fp), recall=rate(tp, tp + fn),
                accuracy=rate(sum(r["correct"] for r in ok), len(ok)),
                positive_rate=(tp + fn) / len(ok) if ok else None)


def _generate(ok: list[dict[str, Any]]) -> dict[str, Any]:
    tgt = [r for r in ok if "exact_match" in r]
    s: dict[str, Any] = dict(completion_tokens=sum(r["n_completion_tokens"] for r in ok), with_target=len(tgt))
    if tgt:
        s.update(interval=INTERVAL, exact_match=rate(sum(r["exact_match"] for r in tgt), len(tgt)))
    return s


def timing(start: float, examples: int, tokens: int) -> dict[str, float]:
    """Seconds since `start` (a time.perf_counter value) and the examples and tokens per second."""
    dt = max(time.perf_counter() - start, 1e-9)
    return {"seconds": dt, "examples_per_s": examples / dt, "tokens_per_s": tokens / dt}


def _count(n: int | None) -> str:
    return "n/a" if n is None else str(n)


def _number(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _rate_text(r: dict[str, Any]) -> str:
    """'0.6667 (4 of 6), 95% Wilson interval [0.3000, 0.9032]' of a `rate` entry."""
    lo, hi = r["ci95"]
    if not r["n"]:
        return "n/a (0 of 0)"
    return f"{_number(r['value'])} ({r['correct']} of {r['n']}), 95% Wilson interval [{lo:.4f}, {hi:.4f}]"


def headline(s: dict[str, Any]) -> list[str]:
    """The headline metrics of a summary as aligned 'name: value' lines (the program prints them on stdout)."""
    task = s["task"]
    if task == "perplexity":
        items = [("perplexity", _number(s["perplexity"])), ("bits_per_byte", _number(s["bits_per_byte"])),
                 ("tokens_scored", f"{s['tokens_scored']} (tokens_run {_count(s['tokens_run'])})")]
    elif task == "choice":
        items = [(k, _rate_text(s[k])) for k in ("acc", "acc_norm")] + [("chance", _number(s["chance"]))]
    elif task == "moderate":
        items = [(k, _rate_text(s[k])) for k in ("precision", "recall", "accuracy")]
    else:
        items = [("exact_match", _rate_text(s["exact_match"]) if "exact_match" in s
                  else "n/a (no example has a \"target\")")]
    width = max(len(k) for k, _ in items) + 1
    return [f"{k + ':':<{width}} {v}" for k, v in items]

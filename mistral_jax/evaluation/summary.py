"""Task metrics over an evaluation's output rows (summary.json), and the one exact-match rule.

- perplexity: overall token NLL, perplexity exp(mean NLL) and bits per byte (summed NLL / ln 2 / UTF-8
  bytes), from the sums over documents (token-weighted).
- choice: accuracy of argmax summed log-likelihood and of argmax log-likelihood per UTF-8 byte, with 95%
  Wilson score intervals, and the chance rate.
- generate: exact match (`exact_match`) over the examples with a target, with a 95% Wilson interval.
- moderate: "unacceptable" is the positive class: precision = TP / (TP + FP), recall = TP / (TP + FN),
  accuracy, each with a 95% Wilson interval.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

import numpy as np

from mistral_jax.evaluation.examples import MODERATION_LABELS
from mistral_jax.inference.scoring import wilson_interval

INTERVAL = "Wilson score, 95%"


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
    return s


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

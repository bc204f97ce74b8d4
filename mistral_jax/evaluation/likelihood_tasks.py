"""The log-likelihood tasks (perplexity, choice, moderate): examples become scoring requests, scored in
buckets by `scoring.Scorer`; each example's row is written as soon as its last request is scored.

Per example:
- perplexity: the summed NLL (nats) of its tokens after BOS, the mean token NLL, perplexity exp(mean NLL)
  and bits per byte (summed NLL / ln 2 / UTF-8 bytes of the text). Long documents follow
  `scoring.rolling_windows`.
- choice: the summed log-likelihood of each scored continuation (delimiter + choice) and per UTF-8 byte of
  it; the predictions are their argmax (ties go to the lowest index).
- moderate: the text is put into a classification template (`prompts.MODERATE` by default, the placeholder
  {text} replaced) and classified by the larger summed log-likelihood of the two label words ("acceptable",
  "unacceptable") as continuations (ties: "acceptable"). With chat, the label word is scored as the start
  of the assistant answer (its SentencePiece encoding).
Every row also gets "n_tokens_run": the input positions its requests ran through the model (BOS and context
included, padding excluded; see `summary` for tokens scored vs tokens run).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.evaluation import prompts
from mistral_jax.evaluation.encoding import Settings, check_vocab, encode_pair, encode_prompt
from mistral_jax.evaluation.examples import MODERATION_LABELS, Example, check_choice, check_moderate, check_text
from mistral_jax.evaluation.fewshot import FEWSHOT_DELIMITER
from mistral_jax.evaluation.output import Output, ProgressFn, base_row
from mistral_jax.inference import scoring


def run_scoring_task(task: str, examples: list[Example], tok: Tokenizer, scorer: scoring.Scorer, st: Settings,
                     out: Output, progress: ProgressFn) -> None:
    """perplexity / choice / moderate: builds requests, scores them in buckets, writes each example as it
    completes (an example that cannot be scored gets a row with its "error")."""
    prepare, finish = {"perplexity": (_prepare_perplexity, _finish_perplexity),
                       "choice": (_prepare_choice, _finish_choice),
                       "moderate": (_prepare_moderate, _finish_moderate)}[task]
    requests: list[scoring.Request] = []
    owner: list[int] = []                 # request -> index into `pending`
    pending: list[tuple[Example, Any, list[int], int]] = []   # (example, prepared state, request ids, inputs)
    for ex in examples:
        try:
            if ex.error is not None:
                raise ValueError(ex.error)
            state, reqs = prepare(ex, tok, st, scorer.cfg.vocab_size)
        except ValueError as e:
            out.write({**base_row(ex), "error": ex.error or f"{ex.where}: {e}"})
            progress(1, 0)
            continue
        ids = list(range(len(requests), len(requests) + len(reqs)))
        requests += reqs
        owner += [len(pending)] * len(reqs)
        pending.append((ex, state, ids, sum(len(t) - 1 for t, _ in reqs)))
    results: list[scoring.Scored | None] = [None] * len(requests)
    left = [len(p[2]) for p in pending]

    def on_batch(idx: list[int], res: list[scoring.Scored], n_tokens: int) -> None:
        finished = 0
        for i, r in zip(idx, res):
            results[i] = r
            j = owner[i]
            left[j] -= 1
            if left[j] == 0:
                ex, state, ids, n_run = pending[j]
                out.write({**base_row(ex), **finish(state, [results[k] for k in ids], st), "n_tokens_run": n_run})
                for k in ids:
                    results[k] = None       # free per-token arrays once written
                finished += 1
        progress(finished, n_tokens)

    scorer.score(requests, on_batch)


def _request(ids: list[int], n_score: int, vocab: int, max_input: int, what: str) -> scoring.Request:
    """(ids, n_score) once the ids are in the vocabulary and fit the evaluation context; ValueError naming
    `what` otherwise."""
    check_vocab(ids, vocab)
    if len(ids) - 1 > max_input:
        raise ValueError(f"{what} is {len(ids)} tokens, longer than the evaluation context of {max_input} + 1")
    return ids, n_score


def _prepare_perplexity(ex: Example, tok: Tokenizer, st: Settings, vocab: int):
    text = check_text(ex.obj)
    ids = tok.encode(text, bos=True)
    if len(ids) < 2:
        raise ValueError("empty document: no tokens to score")
    check_vocab(ids, vocab)
    wins = scoring.rolling_windows(len(ids), st.max_input, st.overlap)
    return (text, len(ids) - 1, len(wins)), [(ids[w.start:w.end], w.n_score) for w in wins]


def _finish_perplexity(state, res: list[scoring.Scored], st: Settings) -> dict[str, Any]:
    text, n_tok, n_win = state
    lp = np.concatenate([r.logprobs for r in res]).astype(np.float64)
    nll = float(-lp.sum())
    n_bytes = len(text.encode("utf-8"))
    row = {"n_tokens": n_tok, "n_bytes": n_bytes, "n_windows": n_win, "nll": nll, "token_nll": nll / n_tok,
           "perplexity": math.exp(nll / n_tok), "bits_per_byte": nll / math.log(2) / n_bytes}
    if st.token_logprobs:
        row["token_logprobs"] = [float(x) for x in lp]
    return row


def _prepare_choice(ex: Example, tok: Tokenizer, st: Settings, vocab: int):
    context, choices, label = check_choice(ex.obj)
    shots: list[Example] = []
    if st.fewshot is not None:
        shots = st.fewshot.draw(ex)
        parts = []
        for sh in shots:
            c, ch, lb = check_choice(sh.obj)
            parts.append(c + st.delimiter + ch[lb])
        context = FEWSHOT_DELIMITER.join(parts + [context])
    reqs = []
    for j, c in enumerate(choices):
        ctx_ids, cont_ids = encode_pair(tok, context, st.delimiter + c)
        if not cont_ids:
            raise ValueError(f"choices[{j}] {c!r} encodes to no tokens after the context")
        reqs.append(_request(ctx_ids + cont_ids, len(cont_ids), vocab, st.max_input, f"context + choices[{j}]"))
    return (label, [len((st.delimiter + c).encode("utf-8")) for c in choices], [s.key for s in shots]), reqs


def _finish_choice(state, res: list[scoring.Scored], st: Settings) -> dict[str, Any]:
    label, n_bytes, shot_keys = state
    ll = [r.total for r in res]
    ll_norm = [x / b for x, b in zip(ll, n_bytes)]
    pred, pred_norm = int(np.argmax(ll)), int(np.argmax(ll_norm))
    extra = {"fewshot": shot_keys} if st.fewshot is not None else {}
    return {**extra, "label": label, "loglik": ll, "loglik_per_byte": ll_norm, "is_greedy": [r.is_greedy for r in res],
            "n_tokens": [len(r.logprobs) for r in res], "pred": pred, "pred_norm": pred_norm,
            "correct": pred == label, "correct_norm": pred_norm == label}


def _prepare_moderate(ex: Example, tok: Tokenizer, st: Settings, vocab: int):
    text, label = check_moderate(ex.obj)
    prompt = prompts.fill_template(st.moderation_template, text)
    if st.chat or st.system_prompt is not None:
        ctx = encode_prompt({"prompt": prompt}, tok, dataclasses.replace(st, chat=True))
        conts = [tok.encode(w) for w in MODERATION_LABELS]
    else:
        pairs = [encode_pair(tok, prompt, st.delimiter + w) for w in MODERATION_LABELS]
        ctx, conts = pairs[0][0], [c for _, c in pairs]
    reqs = [_request(ctx + cont, len(cont), vocab, st.max_input, f"the moderation prompt + {w!r}")
            for w, cont in zip(MODERATION_LABELS, conts)]
    return label, reqs


def _finish_moderate(label: str, res: list[scoring.Scored], st: Settings) -> dict[str, Any]:
    ll = {w: r.total for w, r in zip(MODERATION_LABELS, res)}
    neg, pos = MODERATION_LABELS
    pred = pos if ll[pos] > ll[neg] else neg
    return {"label": label, "loglik": ll, "is_greedy": {w: r.is_greedy for w, r in zip(MODERATION_LABELS, res)},
            "n_tokens": {w: len(r.logprobs) for w, r in zip(MODERATION_LABELS, res)}, "pred": pred,
            "correct": pred == label}

"""The generate task: prompts through `decode.generate` in length-sorted batches, each completion compared
with the example's optional "target" by `summary.exact_match`."""

from __future__ import annotations

from typing import Any

from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.evaluation.encoding import Settings, encode_prompt
from mistral_jax.evaluation.examples import Example, check_target
from mistral_jax.evaluation.output import Output, ProgressFn, base_row
from mistral_jax.evaluation.summary import exact_match
from mistral_jax.inference import decode


def _prepare(examples: list[Example], tok: Tokenizer, cfg: Any, st: Settings, out: Output,
             progress: ProgressFn) -> list[tuple[Example, list[int], list[Example]]]:
    """(example, prompt ids, shots) of each example that can run; the others get a row with their "error"."""
    todo = []
    for ex in examples:
        try:
            if ex.error is not None:
                raise ValueError(ex.error)
            shots = st.fewshot.draw(ex) if st.fewshot is not None else []
            ids = encode_prompt(ex.obj, tok, st, shots)
            decode.check_prompt(ids, cfg, st.max_new_tokens)
            check_target(ex.obj)
            todo.append((ex, ids, shots))
        except ValueError as e:
            out.write({**base_row(ex), "error": ex.error or f"{ex.where}: {e}"})
            progress(1, 0)
    return todo


def run_generate_task(examples: list[Example], tok: Tokenizer, params: Any, cfg: Any, mesh: Any, dtype: Any,
                      st: Settings, out: Output, progress: ProgressFn) -> None:
    """generate: writes each example's completion, its finish reason and, with a target, its exact match."""
    todo = _prepare(examples, tok, cfg, st, out, progress)
    todo.sort(key=lambda t: -len(t[1]))
    n_batches = -(-len(todo) // st.batch_size)
    for b in range(0, len(todo), st.batch_size):
        batch = todo[b:b + st.batch_size]
        gen = decode.generate(params, cfg, [ids for _, ids, _ in batch], st.max_new_tokens, temperature=st.temperature,
                              top_k=st.top_k, top_p=st.top_p, seed=st.seed,
                              row_ids=[(ex.line or 0) for ex, _, _ in batch], mesh=mesh, dtype=dtype,
                              eos_id=tok.eos_id, pad_batch_to=st.batch_size if n_batches > 1 else None,
                              return_info=True)
        n_tok = 0
        for (ex, ids, shots), comp, eos in zip(batch, gen.tokens, gen.stopped_on_eos):
            extra = {"fewshot": [sh.key for sh in shots]} if st.fewshot is not None else {}
            row = {**base_row(ex), **extra, "completion": tok.decode(comp), "n_prompt_tokens": len(ids),
                   "n_completion_tokens": len(comp), "finish_reason": "eos" if eos else "length"}
            if "target" in ex.obj:
                row["target"] = ex.obj["target"]
                row["exact_match"] = exact_match(row["completion"], ex.obj["target"])
            out.write(row)
            n_tok += len(ids) + len(comp)
        progress(len(batch), n_tok)

"""A training run's evaluations: the held-out loss, greedy answers' exact match (fine-tuning) and, at the end,
the export of the final params and a sample.

With LoRA the held-out loss is taken with the adapters unmerged (the frozen base packed once, no copy); the
final export merges the adapters into the base in place (`lora.merge_in_place`), never holding the model twice.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterator

import jax
from jax.sharding import Mesh

from mistral_jax.checkpoint import peft
from mistral_jax.checkpoint.native import save_params
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.errors import DataError
from mistral_jax.evaluation.summary import exact_match
from mistral_jax.inference.decode import generate
from mistral_jax.model import lora as lora_lib
from mistral_jax.model import packing
from mistral_jax.model.config import ModelConfig
from mistral_jax.runtime import distributed
from mistral_jax.runtime.files import write_atomic
from mistral_jax.training import run_config as rc_lib
from mistral_jax.training import train_step as ts
from mistral_jax.training.metrics import ScalarSinks
from mistral_jax.training.run_setup import RunSetup

EXAMPLE_WIDTH = 160   # characters of an example's message or answer in the log


def heldout_loss(params: Any, cfg: ModelConfig, mesh: Mesh, val_stream: Iterator, n_batches: int, dtype: Any,
                 param_dtype: Any, lora: Any = None, base: Any = None) -> tuple[float, int]:
    """(mean NLL per target token, target count) over the first n_batches held-out batches; with LoRA,
    `params` are the adapters and `base` the frozen base weights (packed here: no copy)."""
    eval_fn = ts.make_eval_step(cfg, mesh, dtype=dtype, param_dtype=param_dtype, lora=lora)
    args = (params,) if lora is None else (params, packing.pack(base))
    total, count = 0.0, 0.0
    for _ in range(n_batches):
        try:
            batch = next(val_stream)
        except StopIteration:
            break
        s, n = jax.device_get(eval_fn(*args, ts.put_batch(batch, mesh, 1, len(getattr(val_stream, "shards", [0])))))
        total, count = total + float(s), count + float(n)
    if count == 0:
        raise DataError("held-out set produced no tokens (data.val_percent too small?)")
    return total / count, int(count)


def answer_exact_match(params: Any, cfg: ModelConfig, mesh: Mesh, tokenizer: Tokenizer,
                       answers: list[tuple[list[int], str]], seed: int, batch_size: int = 16,
                       max_new_tokens: int = 64) -> tuple[float, list[dict[str, Any]]]:
    """(share of prompts whose greedy answer equals the reference after stripping spaces, rows)."""
    rows = []
    for i in range(0, len(answers), batch_size):
        chunk = answers[i:i + batch_size]
        outs = generate(params, cfg, [p for p, _ in chunk], max_new_tokens, seed=seed, mesh=mesh)
        for (_, ref), out in zip(chunk, outs):
            got = tokenizer.decode(out)
            rows.append({"reference": ref, "answer": got, "match": exact_match(got, ref)})
    return (sum(r["match"] for r in rows) / len(rows) if rows else 0.0), rows


def evaluate(s: RunSetup, params: Any, sinks: ScalarSinks, step: int = 0, tag: str = "", base: Any = None,
             plain: Any | Callable[[], Any] = None) -> dict[str, Any]:
    """Held-out loss (on the answers for fine-tuning) and greedy answers' exact match, per rc.eval.

    With LoRA, `params` are the adapters and `base` the frozen base weights. `plain` are the plain model's
    params for the greedy answers, or a function making them (called after the held-out loss); by default
    `params`, or with LoRA `lora.merge` of adapters and base (a copy of the adapted weights).
    tag "" is the final evaluation; another tag (e.g. "before") prefixes the summary fields and files.
    """
    out = heldout_summary(s, params, sinks, step, tag, base)
    if s.rc.eval.answers and s.data.answers:
        if plain is None and s.lora is not None:
            plain = lora_lib.merge(lora_lib.join(params, base), s.lora)
        plain = plain() if callable(plain) else params if plain is None else plain
        out.update(answers_summary(s, plain, sinks, step, tag))
    return out


def _label(tag: str) -> tuple[str, str]:
    """(summary field prefix, log label) of an evaluation's tag."""
    return (f"{tag}_" if tag else ""), (f"held-out ({tag})" if tag else "held-out")


def heldout_summary(s: RunSetup, params: Any, sinks: ScalarSinks, step: int = 0, tag: str = "",
                    base: Any = None) -> dict[str, Any]:
    """The held-out loss fields of `evaluate` (none without held-out data or eval.batches)."""
    rc = s.rc
    if not (rc.eval.batches and s.data.val is not None):
        return {}
    pre, label = _label(tag)
    what = "answer loss" if rc.data.source in rc_lib.CHAT_SOURCES else "loss"
    val_loss, n = heldout_loss(params, s.cfg, s.mesh, s.data.val, rc.eval.batches, s.dtype, s.param_dtype, s.lora,
                               base)
    s.log(f"{label}: {what} {val_loss:.4f} nats/token, perplexity {math.exp(val_loss):.2f} over {n} tokens")
    sinks.write({"step": step, "loss": val_loss}, prefix="heldout/")
    return {f"{pre}heldout_loss": val_loss, f"{pre}heldout_perplexity": math.exp(val_loss), f"{pre}heldout_tokens": n}


def answers_summary(s: RunSetup, plain: Any, sinks: ScalarSinks, step: int = 0, tag: str = "") -> dict[str, Any]:
    """The greedy answers' fields of `evaluate`, decoded with the plain model's params `plain`; writes
    <tag_>answers.jsonl (process 0)."""
    pre, label = _label(tag)
    answers = s.data.answers
    score, rows = answer_exact_match(plain, s.cfg, s.mesh, s.tokenizer, answers[:s.rc.eval.answers], s.rc.train.seed)
    if distributed.is_main():       # every process decodes; process 0 writes
        write_atomic(s.run_dir / f"{pre}answers.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    s.log(f"{label} greedy answers: exact match {score:.3f} over {len(rows)} conversations ({pre}answers.jsonl)")
    if rows:
        s.log(example_lines(label, s.tokenizer, answers[0][0], rows[0]["answer"], rows[0]["reference"]))
    sinks.write({"step": step, "exact_match": score}, prefix="heldout/")
    return {f"{pre}heldout_exact_match": score, f"{pre}heldout_answers": len(rows)}


def one_line(text: str, width: int = EXAMPLE_WIDTH) -> str:
    """`text` with its whitespace runs as single spaces, cut to `width` characters (ending in '...')."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def last_user_message(tokenizer: Tokenizer, prompt: list[int]) -> str:
    """The last user message of a chat prompt's ids: the text after its last `[INST]` (a control token of v2/v3
    tokenizers, plain text in v1) up to `[/INST]`; the whole decoded prompt if it has none."""
    sp = getattr(tokenizer, "sp", None)
    if sp is not None and tokenizer.vocab_size > 4 and sp.id_to_piece(3) == "[INST]" and sp.is_control(3):
        start = max((i for i, t in enumerate(prompt) if t == 3), default=-1) + 1
        prompt = [t for t in prompt[start:] if t != 4]
    text = tokenizer.decode(prompt)
    return text.rpartition("[INST]")[2].partition("[/INST]")[0] if "[INST]" in text else text


def example_lines(label: str, tokenizer: Tokenizer, prompt: list[int], answer: str, reference: str) -> str:
    """The log lines of one held-out example: its last user message, then the model's answer and the reference,
    each cut to one readable line."""
    return (f"{label} example: user: {one_line(last_user_message(tokenizer, prompt))}\n"
            f"  -> model: {one_line(answer)} | reference: {one_line(reference)}")


def evaluate_and_export(s: RunSetup, params: Any, sinks: ScalarSinks, step: int = 0, base: Any = None,
                        base_name: str | None = None) -> dict[str, Any]:
    """Per rc.eval: the held-out loss, then the export of the plain params, the greedy answers and a sample;
    returns their summary fields.

    With LoRA (`params` the adapters, `base` the frozen base weights) the held-out loss is taken with the
    adapters unmerged; then, if anything needs the plain model, the adapters are merged into the base in
    place (`lora.merge_in_place`: the base arrays become the merged model, nothing is held twice). Before
    that, the export also writes the adapters as a PEFT folder, <run dir>/adapter, whose
    base_model_name_or_path is `base_name` (the base's path or Hub id; None for random base weights).
    """
    rc = s.rc
    summary = heldout_summary(s, params, sinks, step, "", base)
    answers = bool(rc.eval.answers and s.data.answers)
    plain = params
    if s.lora is not None and rc.eval.export:   # every process calls it (sharded adapters); process 0 writes
        peft.save_peft_adapter(s.run_dir / "adapter", s.cfg, params, s.lora, base_model_name_or_path=base_name,
                               force=True)
        summary["adapter"] = str(s.run_dir / "adapter")
    if s.lora is not None and (rc.eval.export or answers or rc.eval.sample_tokens):
        plain = lora_lib.merge_in_place(lora_lib.join(params, base), s.lora)
    if rc.eval.export:         # every process writes its shards of the params (a shared run dir)
        save_params(s.run_dir / "export", s.cfg, plain, force=True)
        summary["export"] = str(s.run_dir / "export")
        if s.lora is not None:
            summary["export_note"] = "LoRA adapters merged into the weights (W + alpha/rank * A B)"
    if answers:
        summary.update(answers_summary(s, plain, sinks, step))
    if rc.eval.sample_tokens:
        summary.update(_sample(s, plain))
    return summary


def _sample(s: RunSetup, plain: Any) -> dict[str, Any]:
    """A sample for eval.sample_prompt, written to sample.txt (every process decodes; process 0 writes)."""
    e = s.rc.eval
    prompt_ids = s.tokenizer.encode(e.sample_prompt, bos=True)
    out = generate(plain, s.cfg, [prompt_ids], e.sample_tokens, temperature=e.sample_temperature,
                   top_k=e.sample_top_k, seed=s.rc.train.seed, mesh=s.mesh)
    text = s.tokenizer.decode(out[0])
    if distributed.is_main():
        write_atomic(s.run_dir / "sample.txt", e.sample_prompt + text + "\n")
    s.log(f"sample (temperature {e.sample_temperature}) for prompt {e.sample_prompt!r}:\n{e.sample_prompt}{text}")
    return {"sample_prompt": e.sample_prompt, "sample": text}

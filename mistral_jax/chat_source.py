"""Fine-tuning data for the training run: JSONL conversations (or the built-in example set) encoded with
Mistral's instruct templates, split into held-out and training conversations, dealt into `data.shards`
shards of which this process runs its own (see data_shards)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax

from mistral_jax import chat_data as cd
from mistral_jax import data_shards as ds
from mistral_jax import distributed
from mistral_jax.chat_examples import write_examples
from mistral_jax.data_source import DataSource
from mistral_jax.run_config import RunConfig
from mistral_jax.tokenizer import Tokenizer


def example_files(rc: RunConfig, run_dir: Path) -> tuple[list[str], list[str]]:
    """([train.jsonl], [val.jsonl]) of the built-in example set, written into <run dir>/data by process 0
    (the same files for the same data.seed, data.examples and data.example_tasks)."""
    n_val = max(1, math.ceil(rc.data.examples * rc.data.val_percent / 100))
    folder = run_dir / "data"
    if distributed.is_main():
        write_examples(folder, rc.data.examples, n_val, seed=rc.data.seed, tasks=tuple(rc.data.example_tasks))
    distributed.sync("chat-examples-written")
    return [str(folder / "train.jsonl")], [str(folder / "val.jsonl")]


def make_chat_data(rc: RunConfig, tokenizer: Tokenizer, run_dir: Path) -> DataSource:
    """The DataSource of a fine-tuning run (data.source 'chat' or 'chat-examples')."""
    d = rc.data
    chat_tok = cd.as_chat_tokenizer(tokenizer)
    if d.source == "chat-examples":
        paths, val_paths = example_files(rc, run_dir)
    else:
        paths, val_paths = list(d.paths), list(d.val_paths)
    train_files = cd.expand_paths(paths)
    val_files = cd.expand_paths(val_paths) if val_paths else []
    both = sorted({str(f) for f in train_files} & {str(f) for f in val_files})
    if both:
        raise cd.ChatDataError(f"chat data: {both[0]} is both a training and a held-out file")
    data = cd.read_chat_data(train_files + val_files, chat_tok, d.seq_len, d.on_error)
    if val_files:
        names = {str(f) for f in val_files}
        train_c = [c for c in data.conversations if c.file not in names]
        val_c = [c for c in data.conversations if c.file in names]
    else:
        train_c, val_c = data.held_out(d.val_percent)
    n = d.shards
    mine = ds.owned_shards(n, jax.process_index(), jax.process_count())
    per = d.batch_size // n
    train = ds.ShardedStream(n, mine, lambda s: cd.ChatStream(cd.ChatData(train_c[s::n], data.report), None,
                                                              d.seq_len, per, d.seed, shuffle=True))
    val = None
    if val_c:
        val = ds.ShardedStream(n, mine, lambda s: (
            cd.ChatStream(cd.ChatData(val_c[s::n], data.report), None, d.seq_len, per, d.seed, shuffle=False)
            if val_c[s::n] else ds.Exhausted(per, d.seq_len)), endless_padding=True)
    report = data.report.to_dict()
    report.update(train_conversations=len(train_c), heldout_conversations=len(val_c))
    if distributed.is_main():
        (run_dir / "data_report.json").write_text(json.dumps(report, indent=1))
    desc = "\n".join([data.report.summary(), f"chat data: {len(train_c)} training and {len(val_c)} held-out "
                      f"conversations, template {getattr(chat_tok.instruct_tokenizer.tokenizer.version, 'value', '?')}"])
    answers = cd.answer_prompts(val_c, chat_tok, limit=rc.eval.answers or None) if rc.eval.answers else []
    return DataSource(train, val, desc, report=report, answers=answers)

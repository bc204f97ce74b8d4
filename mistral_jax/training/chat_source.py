"""Fine-tuning data for the training run: JSONL conversations (or the built-in example set) encoded with
Mistral's instruct templates, split into held-out and training conversations, dealt into `data.shards`
shards of which this process runs its own (see data/shards.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax

from mistral_jax.data import chat_files as cf
from mistral_jax.data import shards as ds
from mistral_jax.data.chat_stream import ChatStream
from mistral_jax.data.chat_template import as_chat_tokenizer
from mistral_jax.runtime import distributed
from mistral_jax.runtime.files import write_atomic
from mistral_jax.data.chat_examples import write_examples
from mistral_jax.training.data_source import DataSource
from mistral_jax.training.run_config import RunConfig
from mistral_jax.errors import ChatDataError, RunConfigError
from mistral_jax.data.tokenizer import Tokenizer


def example_files(rc: RunConfig, run_dir: Path) -> tuple[list[str], list[str]]:
    """([train.jsonl], [val.jsonl]) of the built-in example set, written into <run dir>/data by process 0
    (the same files for the same data.seed, data.examples and data.example_tasks)."""
    n_val = max(1, math.ceil(rc.data.examples * rc.data.val_percent / 100))
    folder = run_dir / "data"
    if distributed.is_main():
        write_examples(folder, rc.data.examples, n_val, seed=rc.data.seed, tasks=tuple(rc.data.example_tasks))
    distributed.sync("chat-examples-written")
    return [str(folder / "train.jsonl")], [str(folder / "val.jsonl")]


def read_share(rc: RunConfig, chat_tok: Any, train_files: list, val_files: list, process_index: int,
               process_count: int) -> tuple[list[cf.EncodedConversation], list[cf.EncodedConversation], cf.ChatReport]:
    """(training, held-out conversations, report) of one process's share of the chat files: the lines at
    positions i (over all lines of the training, then the held-out files) with i % data.shards among the
    shards it runs. No other line is parsed or encoded."""
    n = rc.data.shards
    mine = set(ds.owned_shards(n, process_index, process_count))
    data = cf.read_chat_data(train_files + val_files, chat_tok, rc.data.seq_len, rc.data.on_error,
                             select=lambda i: i % n in mine)
    return (*data.split(val_files, rc.data.val_percent), data.report)


def make_chat_data(rc: RunConfig, tokenizer: Tokenizer, run_dir: Path) -> DataSource:
    """The DataSource of a fine-tuning run (data.source 'chat' or 'chat-examples').

    Each process reads its own share of the lines (`read_share`); the report, the conversation counts and
    the held-out answer prompts (every process decodes them all) are gathered from all processes.
    """
    d = rc.data
    chat_tok = as_chat_tokenizer(tokenizer)
    if d.source == "chat-examples":
        paths, val_paths = example_files(rc, run_dir)
    else:
        paths, val_paths = list(d.paths), list(d.val_paths)
    train_files = cf.expand_paths(paths)
    val_files = cf.expand_paths(val_paths) if val_paths else []
    overlap = cf.overlap_message(train_files, val_files)    # compared as files, not as the names typed
    if overlap:
        raise RunConfigError(f"[data] fields 'paths' and 'val_paths': {overlap}")
    error, train_c, val_c, local = None, [], [], None
    try:
        train_c, val_c, local = read_share(rc, chat_tok, train_files, val_files, jax.process_index(),
                                           jax.process_count())
    except ChatDataError as e:          # every process learns of it, and all stop with the same message
        error = str(e)
    limit = rc.eval.answers
    mine = ([[c.index, ids, ref] for c, (ids, ref) in zip(val_c, cf.answer_prompts(val_c, chat_tok, limit))]
            if limit else [])
    n = d.shards
    mine_shards = ds.owned_shards(n, jax.process_index(), jax.process_count())
    per_shard = {s: sum(c.index % n == s for c in train_c) for s in mine_shards}
    parts = distributed.allgather_json({"error": error, "report": local.to_dict() if local else None,
                                        "train": len(train_c), "val": len(val_c), "answers": mine,
                                        "per_shard": per_shard})
    errors = [q["error"] for q in parts if q["error"]]
    if errors:
        raise ChatDataError(errors[0])
    report_obj = cf.ChatReport.merged([q["report"] for q in parts])
    n_train, n_val = sum(q["train"] for q in parts), sum(q["val"] for q in parts)
    report = report_obj.to_dict()
    report.update(train_conversations=n_train, heldout_conversations=n_val)
    if distributed.is_main():     # also when the data is unusable: the report says why
        write_atomic(run_dir / "data_report.json", json.dumps(report, indent=1))
    if not n_train:
        where = "training file(s) " + ", ".join(str(f) for f in train_files[:3]) + (" ..." if len(train_files) > 3
                                                                                 else "")
        held = f" ({n_val} held out)" if n_val else ""
        raise ChatDataError(f"chat data: no usable conversations in {where}{held}: {report_obj.counts()}; "
                               f"first problems in {run_dir / 'data_report.json'}")
    empty = sorted(int(s) for q in parts for s, k in q["per_shard"].items() if not k)
    if empty:
        raise ChatDataError(f"chat data: shard(s) {empty[:5]} of data.shards={n} hold no training "
                               f"conversation ({n_train} in all, dealt by line); lower data.shards")
    answers = [(ids, ref) for _, ids, ref in sorted((a for q in parts for a in q["answers"]),
                                                    key=lambda a: a[0])[:limit]] if limit else []
    per = d.batch_size // n
    local_report = local if local is not None else report_obj

    def shard(convs: list[cf.EncodedConversation], s: int) -> cf.ChatData:
        return cf.ChatData([c for c in convs if c.index % n == s], local_report)

    train = ds.ShardedStream(n, mine_shards, lambda s: ChatStream(shard(train_c, s), per, d.seed, shuffle=True))

    def val_stream(s: int) -> ChatStream | ds.Exhausted:
        held = shard(val_c, s)
        if not held.conversations:
            return ds.Exhausted(per, d.seq_len)
        return ChatStream(held, per, d.seed, shuffle=False)

    val = ds.ShardedStream(n, mine_shards, val_stream, endless_padding=True) if n_val else None
    version = getattr(chat_tok.instruct_tokenizer.tokenizer.version, "value", "?")
    desc = "\n".join([report_obj.summary(), f"chat data: {n_train} training and {n_val} held-out "
                      f"conversations, template {version}"])
    return DataSource(train, val, desc, report=report, answers=answers)

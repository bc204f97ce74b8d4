"""The data a run reads, chosen by `data.source`.

Pretraining (`stdlib`, `files`) packs whole documents and trains on every token; fine-tuning (`chat`,
`chat-examples`) packs conversations and trains on the assistant answers only (a per-token target mask).
The training loop is the same for both; only this choice differs.
"""

from __future__ import annotations

from pathlib import Path

import jax

from mistral_jax.data import text as data_lib
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.training import chat_source
from mistral_jax.training.data_source import DataSource
from mistral_jax.training.run_config import CHAT_SOURCES, RunConfig


def is_chat(rc: RunConfig) -> bool:
    return rc.data.source in CHAT_SOURCES


def make_data(rc: RunConfig, tokenizer: Tokenizer, run_dir: Path) -> DataSource:
    """The DataSource for rc.data (chat data is read with the model vocab's instruct template)."""
    if is_chat(rc):
        return chat_source.make_chat_data(rc, tokenizer, run_dir)
    train, val, corpus = data_lib.make_streams(rc.data, tokenizer, jax.process_index(), jax.process_count())
    desc = (corpus.describe(rc.data.max_bytes)
            + f"; {len(train.files)} train, {len(val.files) if val else 0} held out")
    return DataSource(train, val, desc)

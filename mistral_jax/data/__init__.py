"""Text and conversations to token batches: tokenizer, document packing, chat templates, shards over processes, sources."""

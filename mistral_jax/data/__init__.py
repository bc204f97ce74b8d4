"""Text and conversations to token batches: the tokenizer, document packing, chat templates and chat files,
packed resumable streams, and shards spread over processes."""

"""The Mistral transformer: config and presets, rotary embeddings, attention and its backends, the KV cache,
LoRA, sharding rules."""

"""Checkpoints: the native orbax format, PyTorch layouts (mistral-inference, Hugging Face) in and out,
integrity checks, training state."""

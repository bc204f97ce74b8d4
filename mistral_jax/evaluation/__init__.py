"""Evaluation tasks, system prompts and the lm-eval backend."""

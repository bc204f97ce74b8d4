"""Checkpoint conversion tool: `python -m convert SRC DST ...` (see `convert.__main__`)."""

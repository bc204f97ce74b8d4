"""The process around the model: multi-host start-up, out-of-memory reports, prefetching, dtype names, atomic
files and JSON Lines."""

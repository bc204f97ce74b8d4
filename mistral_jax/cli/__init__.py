"""The command-line programs: `mistral-jax SUBCOMMAND` or `python -m train.X` / `python -m infer.X`."""

"""`python -m infer.convert`: checkpoint conversion (`mistral_jax.cli.convert`; also `mistral-jax convert`)."""

import sys

from mistral_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())

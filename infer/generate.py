"""`python -m infer.generate`: text generation (`mistral_jax.cli.generate`; also `mistral-jax generate`)."""

import sys

from mistral_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())

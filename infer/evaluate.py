"""`python -m infer.evaluate`: evaluation tasks (`mistral_jax.cli.evaluate`; also `mistral-jax evaluate`)."""

import os
import sys

from mistral_jax.cli.evaluate import main

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

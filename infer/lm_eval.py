"""`python -m infer.lm_eval`: lm-eval harness tasks (`mistral_jax.cli.lm_eval`; also `mistral-jax lm-eval`)."""

import sys

from mistral_jax.cli.lm_eval import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m train.plan`: the memory plan of a run (`mistral_jax.cli.plan`; also `mistral-jax plan`)."""

import sys

from mistral_jax.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m train.pretrain`: pretraining on documents (`mistral_jax.cli.pretrain`; also `mistral-jax pretrain`)."""

import sys

from mistral_jax.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())

"""`python -m train.finetune`: instruction fine-tuning on conversations (`mistral_jax.cli.finetune`; also
`mistral-jax finetune`)."""

import sys

from mistral_jax.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())

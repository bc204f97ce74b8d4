"""Alias of `python -m convert` (the checkpoint converter's former name)."""
import sys
from convert.__main__ import main
if __name__ == "__main__":
    sys.exit(main())

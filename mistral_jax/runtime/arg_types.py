"""Argparse types shared by the programs (light: no jax), so a bad flag is refused before anything loads."""

from __future__ import annotations

import argparse
from typing import Callable


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi] (no upper bound when hi is None)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'}, "
                                             f"got {v}")
        return v
    return parse

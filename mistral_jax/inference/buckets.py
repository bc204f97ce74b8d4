"""Length buckets: pad variable-length batches to a few fixed lengths so jit compiles a few programs."""

from __future__ import annotations

from typing import Sequence


def length_buckets(max_len: int, smallest: int = 64, multiple: int = 1) -> tuple[int, ...]:
    """Bucket lengths smallest, 2*smallest, 4*smallest, ... below max_len, then max_len itself.

    Every bucket is a multiple of `multiple` (e.g. the prefill chunk); the last one is max_len rounded
    up to it, so any length in [1, max_len] has a bucket.
    """
    for name, v in (("max_len", max_len), ("smallest", smallest), ("multiple", multiple)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"length_buckets: {name} must be an integer >= 1, got {v!r}")
    up = lambda n: -(-n // multiple) * multiple  # noqa: E731
    out: list[int] = []
    b = smallest
    while b < max_len:
        if not out or up(b) > out[-1]:
            out.append(up(b))
        b *= 2
    if not out or up(max_len) > out[-1]:
        out.append(up(max_len))
    return tuple(out)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; ValueError naming n and the largest bucket when none is."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets) if buckets else None}")

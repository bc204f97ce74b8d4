"""Running a reference script under its own venv from the main benches (standard library only).

A reference (bench/hf_flax_ref.py, bench/easydel_ref.py) needs libraries that cannot share this repository's
environment (transformers 4.57 for the Flax port; EasyDeL with its own jax). The main bench writes the weights
as a Hugging Face folder and runs the script there with that venv's python; the script prints one JSON line.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NOT_RUN = "not run (no venv)"


@dataclass(frozen=True)
class Reference:
    """One reference script, the venv it runs in by default, and the bench option that names another venv."""
    script: Path            # the reference script (run as `python script mode folder args...`)
    default_python: Path    # used when it exists and the option is not given
    flag: str               # e.g. --hf-flax-python
    what: str               # what the venv holds, for --help

    def add_cli_option(self, parser) -> None:
        """The bench's option for this reference's python ('none' skips it)."""
        parser.add_argument(self.flag, default=None, metavar="PATH",
                            help=f"python of a venv with {self.what} (default {self.default_python} if it exists; "
                                 "'none' skips it)")

    def find_python(self, arg: str | None) -> Path | None:
        """The reference's python: the given path, else the default if present; None when there is none."""
        if arg is not None:
            return None if arg.lower() == "none" or not Path(arg).exists() else Path(arg)
        return self.default_python if self.default_python.exists() else None

    def run(self, python: Path | None, mode: str, folder: str | Path, *args: str, timeout: float = 3600
            ) -> dict | str:
        """Runs `script mode folder args...` under `python`; its JSON result, or a short reason it has none."""
        if python is None:
            return NOT_RUN
        cmd = [str(python), str(self.script.resolve()), mode, str(folder), *map(str, args)]
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"not run (timed out after {timeout:.0f} s)"
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if r.returncode != 0 or not lines:
            return f"failed (exit {r.returncode}; see stderr)"
        return json.loads(lines[-1])


def median_time(fn: Callable[[], Any], n: int) -> float:
    """Median wall time of n calls of fn."""
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(statistics.median(ts))


def time_decode(batch: int, prompt_len: int, new: int, repeats: int, generate: Callable[[int], Callable[[], Any]],
                return_tokens: bool, log: Callable[[str], None]) -> dict:
    """One batch size of a reference's decode timing, run inside its venv.

    generate(k) returns a call that generates k tokens after the prompts and gives the (batch, prompt_len + k)
    token ids as a jax array. The first call of each length compiles and is not timed. Then the medians of
    `repeats` calls of `new` and of 1 tokens; the decode step is (t(new) - t(1)) / (new - 1).
    """
    calls = {}
    for k in (1, new):
        calls[k] = generate(k)
        t0 = time.perf_counter()
        calls[k]().block_until_ready()
        log(f"decode batch {batch}, {k} new: compiled + first call {time.perf_counter() - t0:.1f} s")
    toks = calls[new]()[:, prompt_len:].tolist()
    t_new = median_time(lambda: calls[new]().block_until_ready(), repeats)
    t_1 = median_time(lambda: calls[1]().block_until_ready(), repeats)
    step = (t_new - t_1) / max(new - 1, 1)
    log(f"decode batch {batch}: call {t_new:.2f} s ({batch * new / t_new:.1f} tokens/s), step {1e3 * step:.1f} ms")
    return {"batch": batch, "call_s": t_new, "call1_s": t_1, "step_s": step,
            "call_tokens_per_s": batch * new / t_new, "step_tokens_per_s": batch / step if step > 0 else None,
            "tokens": toks if return_tokens else None}

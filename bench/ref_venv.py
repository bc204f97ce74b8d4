"""Running a reference script under its own venv from the main benches (standard library only).

A reference (bench/hf_flax_ref.py, bench/easydel_ref.py) needs libraries that cannot share this repository's
environment (transformers 4.57 for the Flax port; EasyDeL with its own jax). The main bench writes the weights
as a Hugging Face folder and runs the script there with that venv's python; the script prints one JSON line.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

NOT_RUN = "not run (no venv)"


def add_cli_option(parser, flag: str, default: Path, what: str) -> None:
    """A --<name>-python option: the venv's python for one reference (default `default` if it exists; 'none'
    skips it)."""
    parser.add_argument(flag, default=None, metavar="PATH",
                        help=f"python of a venv with {what} (default {default} if it exists; 'none' skips it)")


def find_python(arg: str | None, default: Path) -> Path | None:
    """The reference's python: the given path, else `default` if present; None when there is none."""
    if arg is not None:
        return None if arg.lower() == "none" or not Path(arg).exists() else Path(arg)
    return default if default.exists() else None


def run_reference(python: Path | None, script: Path, mode: str, folder: str | Path, *args: str,
                  timeout: float = 3600) -> dict | str:
    """Runs `script mode folder args...` under `python`; its JSON result, or a short reason it has none."""
    if python is None:
        return NOT_RUN
    cmd = [str(python), str(Path(script).resolve()), mode, str(folder), *map(str, args)]
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"not run (timed out after {timeout:.0f} s)"
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        return f"failed (exit {r.returncode}; see stderr)"
    return json.loads(lines[-1])

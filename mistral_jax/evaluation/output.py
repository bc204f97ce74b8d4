"""The output folder of an evaluation: rows written as examples finish, a summary at the end, and resume.

Each task turns input examples into rows of one JSONL file (`examples.jsonl` in the output folder),
written as examples finish, and a `summary.json` computed from every row at the end. A rerun with the
same output folder reads the rows already there and scores only the examples that have none (a line
torn by a kill is dropped first; other lines that are not rows are skipped, with a note). Examples are
keyed by the resolved data file and line, so a rerun may spell the data's path differently. `run.json`
records the task, data, checkpoint (its path and `integrity.checkpoint_identity`) and settings, and a
rerun that differs in them is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from mistral_jax.errors import EvalError, first_line
from mistral_jax.evaluation.examples import Example, same_file
from mistral_jax.runtime.files import jsonl_lines, parse_json_line, write_atomic

EXAMPLES_FILE, SUMMARY_FILE, RUN_FILE = "examples.jsonl", "summary.json", "run.json"
ProgressFn = Callable[[int, int], None]   # (examples finished, tokens processed)

WRITTEN_FILES = (EXAMPLES_FILE, SUMMARY_FILE, RUN_FILE)


def check_inputs_not_written(folder: Path, inputs: Sequence[tuple[str, Path]], checkpoint: Path | None = None) -> None:
    """EvalError unless no input (flag, path) is a file that a run in output `folder` writes or --overwrite
    deletes, and the folder is not the checkpoint folder."""
    folder = Path(folder)
    for flag, path in inputs:
        for name in WRITTEN_FILES:
            if same_file(path, folder / name):
                raise EvalError(f"{flag} {path}: is {folder / name}, a file this run writes in --output {folder}; "
                                "use another --output")
    if checkpoint is not None and same_file(folder, checkpoint):
        raise EvalError(f"--output {folder}: is the --checkpoint folder; use another --output")


def _checkpoint_named(run: dict[str, Any]) -> str:
    ident = run.get("checkpoint_id")
    return f"{run.get('checkpoint')}" + (f" (identity {ident})" if ident else " (identity not recorded)")


def check_run(run_path: Path, old: dict[str, Any], new: dict[str, Any], keys: Iterable[str] | None = None) -> None:
    """EvalError (one line) when run.json's settings `old` differ from this run's `new` ones (only in `keys`,
    when given): the task first, then the checkpoint (its path and identity), then any other field."""
    hint = "use another --output or --overwrite"
    keys = sorted(set(old) | set(new)) if keys is None else sorted(keys)
    if "task" in keys and old.get("task") != new.get("task"):
        raise EvalError(f"{run_path}: this output folder holds a {old.get('task')!r} evaluation, now --task "
                        f"{new.get('task')}; {hint}")
    if "checkpoint" in keys or "checkpoint_id" in keys:
        same_path = old.get("checkpoint") == new.get("checkpoint")
        if not same_path or old.get("checkpoint_id") != new.get("checkpoint_id"):
            what = "another checkpoint" if not same_path else "the checkpoint has changed since"
            raise EvalError(f"{run_path}: this output folder holds rows scored with checkpoint "
                            f"{_checkpoint_named(old)}, now {_checkpoint_named(new)} ({what}); {hint}")
    for k in keys:
        if k not in ("task", "checkpoint", "checkpoint_id") and old.get(k) != new.get(k):
            raise EvalError(f"{run_path}: this output folder holds a run with {k}={old.get(k)!r}, now "
                            f"{new.get(k)!r}; {hint}")


def read_run(folder: Path) -> dict[str, Any] | None:
    """The run.json of an output folder; None when there is none. EvalError if it is unreadable."""
    run_path = Path(folder) / RUN_FILE
    if not run_path.exists():
        return None
    try:
        old = json.loads(run_path.read_text())
    except (OSError, ValueError) as e:
        raise EvalError(f"{run_path}: unreadable ({first_line(e)}); pass --overwrite to start again") from None
    if not isinstance(old, dict):
        raise EvalError(f"{run_path}: not a JSON object; pass --overwrite to start again")
    return old


class Output:
    """The output folder: run.json (checked on resume), examples.jsonl (appended), summary.json.

    `notes` lists what a resume noticed (rows skipped, dropped or matching no example), one line each.
    """

    def __init__(self, folder: Path, run: dict[str, Any], overwrite: bool = False, writer: bool = True):
        """writer=False (processes other than 0 in a multi-process run): reads what is done, writes nothing."""
        self.folder, self.writer = Path(folder), writer
        self.notes: list[str] = []
        self.examples_path = self.folder / EXAMPLES_FILE
        if not writer:
            self.rows = self._read_rows()
            self.done = {r["key"] for r in self.rows}
            self._fh = None
            return
        if self.folder.exists() and not self.folder.is_dir():
            raise EvalError(f"--output {folder}: exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise EvalError(f"--output {folder}: folder is not writable")
        run_path = self.folder / RUN_FILE
        if overwrite:
            for name in (EXAMPLES_FILE, SUMMARY_FILE, RUN_FILE):
                (self.folder / name).unlink(missing_ok=True)
        old = read_run(self.folder)
        if old is not None:
            check_run(run_path, old, run)
        elif self.examples_path.exists():
            raise EvalError(f"--output {folder}: has {EXAMPLES_FILE} but no {RUN_FILE}; use another --output "
                            "or --overwrite")
        write_atomic(run_path, json.dumps(run, indent=2) + "\n")
        self.rows = self._read_rows()
        self.done = {r["key"] for r in self.rows}
        self._fh = open(self.examples_path, "ab")

    def _read_rows(self) -> list[dict[str, Any]]:
        """Rows already written, in file order. A torn last line (no newline: a run killed mid-write) is cut off
        the file; a complete line that is not a row is skipped and left in place; each gets a note."""
        if not self.examples_path.exists():
            return []
        data = self.examples_path.read_bytes()
        cut = data.rfind(b"\n") + 1
        torn = data[cut:]           # what follows the last newline: b"" unless a write was cut short
        rows, bad = [], []
        for n, raw in jsonl_lines(data[:cut]):
            row, why = parse_json_line(raw)
            if why is not None:
                bad.append(f"line {n}: {why.split(' (')[0]}")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("key"), str):
                bad.append(f"line {n}: not an object with a 'key'")
                continue
            rows.append(row)
        if bad:
            shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
            self.notes.append(f"{self.examples_path}: skipped {len(bad)} line(s) that are not rows ({shown}); left in "
                              "the file, their examples are scored again")
        if torn:
            self.notes.append(f"{self.examples_path}: dropped a torn last line ({len(torn)} bytes without a newline, "
                              "from a run killed while writing); its example is scored again")
            if self.writer:
                with open(self.examples_path, "r+b") as f:
                    f.truncate(len(data) - len(torn))
        return rows

    def resume(self, examples: Sequence[Example]) -> list[Example]:
        """The examples that have no row yet. Keeps one row per example (the first); rows that match no
        example are not counted (a note says how many)."""
        valid = {ex.key for ex in examples}
        kept: dict[str, dict[str, Any]] = {}
        unmatched = duplicate = 0
        for row in self.rows:
            if row["key"] not in valid:
                unmatched += 1
            elif row["key"] in kept:
                duplicate += 1
            else:
                kept[row["key"]] = row
        if duplicate:
            self.notes.append(f"{self.examples_path}: {duplicate} row(s) repeat an example already there; the first "
                              "row of each example is kept")
        if unmatched:
            self.notes.append(f"{self.examples_path}: {unmatched} row(s) match no example of --data; not counted")
        self.rows, self.done = list(kept.values()), set(kept)
        return [ex for ex in examples if ex.key not in self.done]

    def write(self, row: dict[str, Any]) -> None:
        """Appends one example's row (flushed at once)."""
        if self._fh is not None:
            self._fh.write(json_line(row))
            self._fh.flush()
        self.rows.append(row)
        self.done.add(row["key"])

    def close(self) -> None:
        """Closes examples.jsonl."""
        if self._fh is not None:
            self._fh.close()

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Writes summary.json (atomically)."""
        if not self.writer:
            return
        write_atomic(self.folder / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def json_line(row: dict[str, Any]) -> bytes:
    """One JSONL line of `row`, UTF-8 with non-ASCII kept as is; all ASCII (escaped) when a string holds a lone
    surrogate (from a "\\ud800" escape), which UTF-8 cannot encode."""
    text = json.dumps(row, ensure_ascii=False)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(row) + "\n").encode("ascii")


def base_row(ex: Example) -> dict[str, Any]:
    """The fields every row of example `ex` starts with: its key, line and (when given) id."""
    row: dict[str, Any] = {"key": ex.key}
    if ex.line is not None:
        row["line"] = ex.line
    if isinstance(ex.obj, dict) and "id" in ex.obj:
        row["id"] = ex.obj["id"]
    return row

"""Offline evaluation tasks (perplexity, multiple choice, generation) with resumable per-example output.

Each task turns input examples into rows of one JSONL file (`examples.jsonl` in the output folder),
written as examples finish, and a `summary.json` computed from every row at the end. A rerun with the
same output folder reads the rows already there and scores only the examples that have none (a line
torn by a kill is dropped first; other lines that are not rows are skipped, with a note). Examples are
keyed by the resolved data file and line, so a rerun may spell the data's path differently. `run.json`
records the task, data, checkpoint (its path and `integrity.checkpoint_identity`) and settings, and a
rerun that differs in them is refused.

Tokenisation follows lm-evaluation-harness: a (context, continuation) pair is encoded as BOS + the whole
text, and the continuation is what follows the tokens of BOS + context; trailing spaces of the context
move to the continuation.

Metrics:
- perplexity: per document the summed NLL (nats) of its tokens after BOS, the mean token NLL,
  perplexity exp(mean NLL) and bits per byte (summed NLL / ln 2 / UTF-8 bytes of the text); overall the
  same from the sums over documents (token-weighted). Long documents follow `scoring.rolling_windows`.
- choice: accuracy of argmax summed log-likelihood and of argmax log-likelihood per UTF-8 byte of the
  scored continuation (delimiter + choice); ties go to the lowest index; 95% Wilson score intervals.
- generate: exact match (both sides stripped of surrounding whitespace) with a 95% Wilson interval.
- moderate: each text is put into a classification template (`prompts.MODERATE` by default, the placeholder
  {text} replaced) and classified by the larger summed log-likelihood of the two label words
  ("acceptable", "unacceptable") as continuations (ties: "acceptable"). "unacceptable" is the positive
  class: precision = TP / (TP + FP), recall = TP / (TP + FN), accuracy, each with a 95% Wilson interval.

Chat: generate's "messages" examples, and plain prompts or moderation texts with `Settings.chat`, are
encoded by mistral-common (`Tokenizer.encode_chat`), the system prompt (if any) as the first message; a
moderation label word is then scored as the start of the assistant answer (its SentencePiece encoding).

Few-shot (choice, generate): K examples are drawn without replacement from the few-shot pool (a separate
file, or the same data excluding the example itself) by random.Random(f"{seed}:{file name}:{line}"), so
the draw for an example does not depend on batching, order or resume. Prefix format: each shot is
context + delimiter + its answer (choice: the labelled choice; generate: the target), the shots and then
the example's own context joined by FEWSHOT_DELIMITER (a blank line). For chat prompts each shot is a user
turn (its prompt or messages) followed by an assistant turn (its target), before the example's messages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from mistral_jax.evaluation import prompts
from mistral_jax.inference import scoring
from mistral_jax.runtime.files import file_identity
from mistral_jax.errors import first_line
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.errors import EvalError

TASKS = ("perplexity", "choice", "generate", "moderate")
FEWSHOT_TASKS = ("choice", "generate")
CHAT_TASKS = ("generate", "moderate")
MODERATION_LABELS = ("acceptable", "unacceptable")   # label words; the second is the positive class
FEWSHOT_DELIMITER = "\n\n"
EXAMPLES_FILE, SUMMARY_FILE, RUN_FILE = "examples.jsonl", "summary.json", "run.json"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclasses.dataclass
class Example:
    """One input example: key (unique, used for resume), its source location, and the parsed object."""
    key: str                       # "RESOLVED_FILE:LINE" or "RESOLVED_FILE": the same however --data is spelled
    where: str                     # "FILE:LINE" or "FILE", the file as given (for messages)
    line: int | None
    obj: Any = None
    error: str | None = None


# ----- reading input -----

def read_examples(paths: Sequence[Path], task: str) -> list[Example]:
    """Examples from JSONL files (one object per non-blank line) or, for perplexity, plain text files (one
    document per file). Keys name the resolved file, messages the file as given. A bad line becomes an
    Example with `error` naming FILE:LINE; an unreadable file, or one given twice, raises EvalError."""
    out: list[Example] = []
    seen: list[tuple[Path, Path]] = []         # (as given, resolved)
    for path in paths:
        resolved = Path(path).resolve()
        for given, other in seen:
            if same_file(resolved, other):
                raise EvalError(f"--data {path}: the same file as --data {given}; give each file once")
        seen.append((Path(path), resolved))
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise EvalError(f"--data {path}: cannot read ({e.strerror or e})") from None
        if task == "perplexity" and Path(path).suffix.lower() not in JSONL_SUFFIXES:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EvalError(f"--data {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") \
                    from None
            out.append(Example(str(resolved), str(path), None, {"text": text.removeprefix("\ufeff")}))
            continue
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for n, raw in enumerate(lines, 1):
            where = f"{path}:{n}"
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            ex = Example(f"{resolved}:{n}", where, n)
            try:
                ex.obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                ex.error = f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start} of the line)"
            except (ValueError, RecursionError) as e:
                ex.error = f"{where}: not valid JSON ({str(e)[:200]})"
            if ex.error is None and not isinstance(ex.obj, dict):
                ex.error = f"{where}: expected a JSON object, got {type(ex.obj).__name__}"
            out.append(ex)
    return out


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (relative or absolute, a link, a hard link; see `file_identity`)."""
    return file_identity(a) == file_identity(b)


def file_digest(paths: Sequence[Path]) -> str:
    """sha256 over the data files' bytes (resume refuses changed data)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


# ----- output folder: rows written as they finish, resume -----

WRITTEN_FILES = (EXAMPLES_FILE, SUMMARY_FILE, RUN_FILE, f".{SUMMARY_FILE}.tmp", f".{RUN_FILE}.tmp")


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


def check_run(run_path: Path, old: dict[str, Any], new: dict[str, Any], keys: Iterable[str] | None = None) -> list[str]:
    """EvalError (one line) when run.json's settings `old` differ from this run's `new` ones (only in `keys`,
    when given): the task first, then the checkpoint (its path and identity), then any other field. Returns
    notes: a run.json from before checkpoint identities were recorded resumes with one."""
    hint = "use another --output or --overwrite"
    keys = sorted(set(old) | set(new)) if keys is None else sorted(keys)
    if "task" in keys and old.get("task") != new.get("task"):
        raise EvalError(f"{run_path}: this output folder holds a {old.get('task')!r} evaluation, now --task "
                        f"{new.get('task')}; {hint}")
    notes = []
    if "checkpoint" in keys or "checkpoint_id" in keys:
        same_path = old.get("checkpoint") == new.get("checkpoint")
        if same_path and "checkpoint_id" in new and "checkpoint_id" not in old:
            notes.append(f"{run_path} predates checkpoint identities: cannot tell whether {new.get('checkpoint')} "
                         f"changed since its rows were scored; recording its identity {new['checkpoint_id']} now")
        elif not same_path or old.get("checkpoint_id") != new.get("checkpoint_id"):
            what = "another checkpoint" if not same_path else "the checkpoint has changed since"
            raise EvalError(f"{run_path}: this output folder holds rows scored with checkpoint "
                            f"{_checkpoint_named(old)}, now {_checkpoint_named(new)} ({what}); {hint}")
    for k in keys:
        if k not in ("task", "checkpoint", "checkpoint_id") and old.get(k) != new.get(k):
            raise EvalError(f"{run_path}: this output folder holds a run with {k}={old.get(k)!r}, now "
                            f"{new.get(k)!r}; {hint}")
    return notes


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

    `notes` lists what a resume noticed (rows skipped or dropped, fields an older run.json lacks), one line each.
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
            self.notes += check_run(run_path, old, run)
        elif self.examples_path.exists():
            raise EvalError(f"--output {folder}: has {EXAMPLES_FILE} but no {RUN_FILE}; use another --output "
                            "or --overwrite")
        _write_atomic(run_path, json.dumps(run, indent=2) + "\n")
        self.rows = self._read_rows()
        self.done = {r["key"] for r in self.rows}
        self._fh = open(self.examples_path, "ab")

    def _read_rows(self) -> list[dict[str, Any]]:
        """Rows already written, in file order. A torn last line (no newline: a run killed mid-write) is cut off
        the file; a complete line that is not a row is skipped and left in place; each gets a note."""
        if not self.examples_path.exists():
            return []
        data = self.examples_path.read_bytes()
        lines = data.split(b"\n")
        torn = lines.pop()          # what follows the last newline: b"" unless a write was cut short
        rows, bad = [], []
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError):
                bad.append(f"line {n}: not valid JSON")
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
        """The examples that have no row yet. Keeps one row per example (the first), matching a row's key
        however the data file was spelled when it was written; rows that match no example are not counted
        (a note says how many)."""
        valid = {ex.key for ex in examples}
        files: dict[str, list[Path]] = {}           # file name -> resolved data files of that name
        for ex in examples:
            f = Path(ex.key if ex.line is None else ex.key.rsplit(":", 1)[0])
            if f not in files.get(f.name, []):
                files.setdefault(f.name, []).append(f)
        kept: dict[str, dict[str, Any]] = {}
        unmatched = duplicate = 0
        for row in self.rows:
            key = row["key"] if row["key"] in valid else _match_key(row["key"], valid, files)
            if key is None:
                unmatched += 1
            elif key in kept:
                duplicate += 1
            else:
                kept[key] = row if key == row["key"] else {**row, "key": key}
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
            self._fh.write(_json_line(row))
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
        _write_atomic(self.folder / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def _match_key(key: str, valid: set[str], files: dict[str, list[Path]]) -> str | None:
    """The key of `valid` that a row key written with another spelling of its data file means ("FILE:LINE" or
    "FILE"; FILE relative to the working folder or absolute, else matched by a file name unique among the data
    files), or None."""
    forms = [(key, "")]
    head, sep, tail = key.rpartition(":")
    if sep and tail.isdigit():
        forms.append((head, sep + tail))
    for path, suffix in forms:
        try:
            cand = f"{Path(path).resolve()}{suffix}"
        except (OSError, RuntimeError, ValueError):
            cand = ""
        if cand in valid:
            return cand
        same_name = files.get(Path(path).name, [])
        if len(same_name) == 1 and f"{same_name[0]}{suffix}" in valid:
            return f"{same_name[0]}{suffix}"
    return None


def _json_line(row: dict[str, Any]) -> bytes:
    text = json.dumps(row, ensure_ascii=False)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(row) + "\n").encode("ascii")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _base_row(ex: Example) -> dict[str, Any]:
    row: dict[str, Any] = {"key": ex.key}
    if ex.line is not None:
        row["line"] = ex.line
    if isinstance(ex.obj, dict) and "id" in ex.obj:
        row["id"] = ex.obj["id"]
    return row


# ----- encoding -----

def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(BOS + context ids, continuation ids) as lm-evaluation-harness's causal models split them."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        return [tok.bos_id], tok.encode(continuation)
    whole = tok.encode(context + continuation, bos=True)
    ctx = tok.encode(context, bos=True)
    return ctx, whole[len(ctx):]


# ----- tasks -----

@dataclasses.dataclass
class Settings:
    """Settings of one evaluation run (those that change results are recorded in run.json)."""
    max_input: int
    overlap: int
    batch_size: int = 8
    delimiter: str = " "
    chat: bool = False
    system_prompt: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    token_logprobs: bool = False
    moderation_template: str = ""
    fewshot: "FewShot | None" = None


# ----- few-shot -----

@dataclasses.dataclass
class FewShot:
    """k shots per example, drawn with `seed` from `pool` (valid examples); same_file: the pool is the
    evaluated data itself, and an example never gets itself as a shot."""
    k: int
    pool: list[Example]
    seed: int
    same_file: bool

    def draw(self, ex: Example) -> list[Example]:
        """The k shots of example `ex` (deterministic in seed, ex's file name and line); ValueError if the
        pool is too small."""
        cands = [p for p in self.pool if not (self.same_file and p.key == ex.key)]
        if len(cands) < self.k:
            raise ValueError(f"--num-fewshot {self.k}: only {len(cands)} usable few-shot example(s) to draw from")
        rng = random.Random(f"{self.seed}:{Path(ex.key.rsplit(':', 1)[0]).name}:{ex.line}")
        return rng.sample(cands, self.k)


def fewshot_pool(examples: Sequence[Example], task: str) -> list[Example]:
    """The examples usable as shots: choice, valid choice examples; generate, examples with a string
    'target' and a valid 'prompt' or 'messages'."""
    out = []
    for ex in examples:
        if ex.error is not None or not isinstance(ex.obj, dict):
            continue
        try:
            if task == "choice":
                _check_choice(ex.obj)
            elif task == "generate":
                _check_prompt_fields(ex.obj)
                if not isinstance(ex.obj.get("target"), str):
                    continue
            else:
                raise EvalError(f"--num-fewshot: not supported for task {task!r} (only {', '.join(FEWSHOT_TASKS)})")
        except EvalError:
            raise
        except ValueError:
            continue
        out.append(ex)
    return out


ProgressFn = Callable[[int, int], None]   # (examples finished, tokens processed)


def run_scoring_task(task: str, examples: list[Example], tok: Tokenizer, scorer: scoring.Scorer, st: Settings,
                     out: Output, progress: ProgressFn) -> None:
    """perplexity / choice: builds requests, scores them in buckets, writes each example as it completes."""
    prepare, finish = {"perplexity": (_prepare_perplexity, _finish_perplexity),
                       "choice": (_prepare_choice, _finish_choice),
                       "moderate": (_prepare_moderate, _finish_moderate)}[task]
    requests: list[scoring.Request] = []
    owner: list[int] = []                 # request -> index into `pending`
    pending: list[tuple[Example, Any, list[int]]] = []   # (example, prepared state, request ids)
    for ex in examples:
        if ex.error is not None:
            out.write({**_base_row(ex), "error": ex.error})
            progress(1, 0)
            continue
        try:
            state, reqs = prepare(ex, tok, st, scorer)
        except ValueError as e:
            out.write({**_base_row(ex), "error": f"{ex.where}: {e}"})
            progress(1, 0)
            continue
        ids = list(range(len(requests), len(requests) + len(reqs)))
        requests += reqs
        owner += [len(pending)] * len(reqs)
        pending.append((ex, state, ids))
    results: list[scoring.Scored | None] = [None] * len(requests)
    left = [len(p[2]) for p in pending]

    def on_batch(idx: list[int], res: list[scoring.Scored], n_tokens: int) -> None:
        finished = 0
        for i, r in zip(idx, res):
            results[i] = r
            j = owner[i]
            left[j] -= 1
            if left[j] == 0:
                ex, state, ids = pending[j]
                out.write({**_base_row(ex), **finish(state, [results[k] for k in ids], st)})
                for k in ids:
                    results[k] = None       # free per-token arrays once written
                finished += 1
        progress(finished, n_tokens)

    scorer.score(requests, on_batch)


def _prepare_perplexity(ex: Example, tok: Tokenizer, st: Settings, scorer: scoring.Scorer):
    text = ex.obj.get("text")
    if not isinstance(text, str):
        raise ValueError(f"'text' must be a string, got {type(text).__name__ if 'text' in ex.obj else 'no text'}")
    ids = tok.encode(text, bos=True)
    if len(ids) < 2:
        raise ValueError("empty document: no tokens to score")
    _check_vocab(ids, scorer.cfg.vocab_size)
    wins = scoring.rolling_windows(len(ids), st.max_input, st.overlap)
    return (text, len(ids) - 1, len(wins)), [(ids[w.start:w.end], w.n_score) for w in wins]


def _finish_perplexity(state, res: list[scoring.Scored], st: Settings) -> dict[str, Any]:
    text, n_tok, n_win = state
    lp = np.concatenate([r.logprobs for r in res]).astype(np.float64)
    nll = float(-lp.sum())
    n_bytes = len(text.encode("utf-8"))
    row = {"n_tokens": n_tok, "n_bytes": n_bytes, "n_windows": n_win, "nll": nll, "token_nll": nll / n_tok,
           "perplexity": math.exp(nll / n_tok), "bits_per_byte": nll / math.log(2) / n_bytes}
    if st.token_logprobs:
        row["token_logprobs"] = [float(x) for x in lp]
    return row


def _check_choice(o: dict[str, Any]) -> tuple[str, list[str], int]:
    """(context, choices, label) of a choice example; ValueError naming the bad field."""
    context, choices, label = o.get("context"), o.get("choices"), o.get("label")
    if not isinstance(context, str):
        raise ValueError(f"'context' must be a string, got {type(context).__name__ if 'context' in o else 'none'}")
    if not isinstance(choices, list) or not choices:
        raise ValueError("'choices' must be a non-empty list of strings" +
                         ("" if isinstance(choices, list) else f", got {type(choices).__name__}"))
    for j, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise ValueError(f"choices[{j}] must be a non-empty string, got {c!r}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"'label' must be an integer in [0, {len(choices)}), got {label!r}")
    return context, choices, label


def _prepare_choice(ex: Example, tok: Tokenizer, st: Settings, scorer: scoring.Scorer):
    context, choices, label = _check_choice(ex.obj)
    shots: list[Example] = []
    if st.fewshot is not None:
        shots = st.fewshot.draw(ex)
        parts = []
        for sh in shots:
            c, ch, lb = _check_choice(sh.obj)
            parts.append(c + st.delimiter + ch[lb])
        context = FEWSHOT_DELIMITER.join(parts + [context])
    reqs = []
    for j, c in enumerate(choices):
        cont = st.delimiter + c
        ctx_ids, cont_ids = encode_pair(tok, context, cont)
        if not cont_ids:
            raise ValueError(f"choices[{j}] {c!r} encodes to no tokens after the context")
        ids = ctx_ids + cont_ids
        _check_vocab(ids, scorer.cfg.vocab_size)
        if len(ids) - 1 > st.max_input:
            raise ValueError(f"context + choices[{j}] is {len(ids)} tokens, longer than the evaluation context of "
                             f"{st.max_input} + 1")
        reqs.append((ids, len(cont_ids)))
    return (label, [len((st.delimiter + c).encode("utf-8")) for c in choices], [s.key for s in shots]), reqs


def _finish_choice(state, res: list[scoring.Scored], st: Settings) -> dict[str, Any]:
    label, n_bytes, shot_keys = state
    ll = [r.total for r in res]
    ll_norm = [x / b for x, b in zip(ll, n_bytes)]
    pred, pred_norm = int(np.argmax(ll)), int(np.argmax(ll_norm))
    extra = {"fewshot": shot_keys} if st.fewshot is not None else {}
    return {**extra, "label": label, "loglik": ll, "loglik_per_byte": ll_norm, "is_greedy": [r.is_greedy for r in res],
            "n_tokens": [len(r.logprobs) for r in res], "pred": pred, "pred_norm": pred_norm,
            "correct": pred == label, "correct_norm": pred_norm == label}


def _prepare_moderate(ex: Example, tok: Tokenizer, st: Settings, scorer: scoring.Scorer):
    o = ex.obj
    text, label = o.get("text"), o.get("label")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' must be a non-empty string, got " +
                         (repr(text) if isinstance(text, str) else type(text).__name__ if "text" in o else "none"))
    if label not in MODERATION_LABELS:
        raise ValueError(f"'label' must be one of {', '.join(repr(x) for x in MODERATION_LABELS)}, got {label!r}")
    prompt = prompts.fill_template(st.moderation_template, text)
    reqs = []
    if st.chat or st.system_prompt is not None:
        ctx = encode_prompt({"prompt": prompt}, tok, dataclasses.replace(st, chat=True))
        conts = [tok.encode(w) for w in MODERATION_LABELS]
    else:
        pairs = [encode_pair(tok, prompt, st.delimiter + w) for w in MODERATION_LABELS]
        ctx, conts = pairs[0][0], [c for _, c in pairs]
    for w, cont in zip(MODERATION_LABELS, conts):
        ids = ctx + cont
        _check_vocab(ids, scorer.cfg.vocab_size)
        if len(ids) - 1 > st.max_input:
            raise ValueError(f"the moderation prompt + {w!r} is {len(ids)} tokens, longer than the evaluation "
                             f"context of {st.max_input} + 1")
        reqs.append((ids, len(cont)))
    return label, reqs


def _finish_moderate(label: str, res: list[scoring.Scored], st: Settings) -> dict[str, Any]:
    ll = {w: r.total for w, r in zip(MODERATION_LABELS, res)}
    pred = MODERATION_LABELS[1] if ll[MODERATION_LABELS[1]] > ll[MODERATION_LABELS[0]] else MODERATION_LABELS[0]
    return {"label": label, "loglik": ll, "is_greedy": {w: r.is_greedy for w, r in zip(MODERATION_LABELS, res)},
            "pred": pred, "correct": pred == label}


def _check_vocab(ids: Sequence[int], vocab: int) -> None:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token id(s) {bad[:5]} outside the model's vocabulary [0, {vocab})")


def _check_prompt_fields(obj: dict[str, Any]) -> None:
    """ValueError unless a generate example has exactly one of a non-empty 'prompt' string or 'messages'."""
    if "prompt" in obj and "messages" in obj:
        raise ValueError("give either 'prompt' or 'messages', not both")
    if "messages" in obj:
        return
    if "prompt" not in obj:
        raise ValueError(f"expected 'prompt' or 'messages', got keys {sorted(obj)[:10]}")
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"'prompt' must be a non-empty string, got {prompt!r}")


def _turns(obj: dict[str, Any], where: str) -> list[Any]:
    """The non-system messages of a generate example ('prompt' becomes one user turn)."""
    if "messages" not in obj:
        return [{"role": "user", "content": obj["prompt"]}]
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise ValueError(f"{where}'messages' must be a list of {{'role', 'content'}} objects, got "
                         f"{type(msgs).__name__}")
    return msgs


def encode_prompt(obj: dict[str, Any], tok: Tokenizer, st: Settings, shots: Sequence[Example] = ()) -> list[int]:
    """Prompt ids of a generate example: 'messages' (chat) or 'prompt' (chat-wrapped with st.chat or a
    system prompt), after few-shot `shots` (examples with 'target'; prefix format in the module note)."""
    _check_prompt_fields(obj)
    if "messages" not in obj and not st.chat and st.system_prompt is None:
        parts = []
        for sh in shots:
            if "prompt" not in sh.obj:
                raise ValueError(f"few-shot example {sh.where} has 'messages'; a plain prompt needs 'prompt' shots")
            parts.append(sh.obj["prompt"] + st.delimiter + sh.obj["target"])
        return tok.encode(FEWSHOT_DELIMITER.join(parts + [obj["prompt"]]), bos=True)
    msgs = list(_turns(obj, ""))
    system = st.system_prompt
    if msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
        if system is not None:
            raise ValueError("'messages' starts with a system message and a system prompt was given "
                             "(--system-prompt/--safe-prompt); give one of them")
        system, msgs = msgs[0].get("content"), msgs[1:]
    prefix: list[Any] = []
    for sh in shots:
        turns = [m for m in _turns(sh.obj, f"few-shot example {sh.where}: ")
                 if not (isinstance(m, dict) and m.get("role") == "system")]
        prefix += turns + [{"role": "assistant", "content": sh.obj["target"]}]
    head = [] if system is None else [{"role": "system", "content": system}]
    return tok.encode_chat(head + prefix + msgs)


def run_generate_task(examples: list[Example], tok: Tokenizer, params: Any, cfg: Any, mesh: Any, dtype: Any,
                      st: Settings, out: Output, progress: ProgressFn) -> None:
    """generate: prompts through `decode.generate` in length-sorted batches; exact match against 'target'."""
    from mistral_jax.inference import decode

    todo: list[tuple[Example, list[int], list[Example]]] = []
    for ex in examples:
        err = ex.error
        if err is None:
            try:
                shots = st.fewshot.draw(ex) if st.fewshot is not None else []
                ids = encode_prompt(ex.obj, tok, st, shots)
                decode.check_prompt(ids, cfg, st.max_new_tokens)
                if "target" in ex.obj and not isinstance(ex.obj["target"], str):
                    raise ValueError(f"'target' must be a string, got {type(ex.obj['target']).__name__}")
                todo.append((ex, ids, shots))
                continue
            except ValueError as e:
                err = f"{ex.where}: {e}"
        out.write({**_base_row(ex), "error": err})
        progress(1, 0)
    todo.sort(key=lambda t: -len(t[1]))
    n_batches = -(-len(todo) // st.batch_size)
    for b in range(0, len(todo), st.batch_size):
        batch = todo[b:b + st.batch_size]
        gen = decode.generate(params, cfg, [ids for _, ids, _ in batch], st.max_new_tokens, temperature=st.temperature,
                              top_k=st.top_k, top_p=st.top_p, seed=st.seed,
                              row_ids=[(ex.line or 0) for ex, _, _ in batch], mesh=mesh, dtype=dtype,
                              eos_id=tok.eos_id, pad_batch_to=st.batch_size if n_batches > 1 else None,
                              return_info=True)
        n_tok = 0
        for (ex, ids, shots), comp, eos in zip(batch, gen.tokens, gen.stopped_on_eos):
            extra = {"fewshot": [sh.key for sh in shots]} if st.fewshot is not None else {}
            row = {**_base_row(ex), **extra, "completion": tok.decode(comp), "n_prompt_tokens": len(ids),
                   "n_completion_tokens": len(comp), "finish_reason": "eos" if eos else "length"}
            if "target" in ex.obj:
                row["target"] = ex.obj["target"]
                row["exact_match"] = row["completion"].strip() == ex.obj["target"].strip()
            out.write(row)
            n_tok += len(ids) + len(comp)
        progress(len(batch), n_tok)


# ----- summaries -----

def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = scoring.wilson_interval(k, n)
    return {"value": k / n if n else None, "correct": k, "n": n, "ci95": [lo, hi]}


def summarize(task: str, rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Task metrics over the output rows (rows with an 'error' are counted, not scored)."""
    rows = list(rows)
    ok = [r for r in rows if "error" not in r]
    s: dict[str, Any] = {"task": task, "examples": len(rows), "scored": len(ok), "errors": len(rows) - len(ok)}
    if task == "perplexity":
        n_tok = sum(r["n_tokens"] for r in ok)
        n_bytes = sum(r["n_bytes"] for r in ok)
        nll = sum(r["nll"] for r in ok)
        s.update(tokens=n_tok, bytes=n_bytes, nll=nll,
                 token_nll=nll / n_tok if n_tok else None,
                 perplexity=math.exp(nll / n_tok) if n_tok else None,
                 bits_per_byte=nll / math.log(2) / n_bytes if n_bytes else None)
    elif task == "choice":
        s.update(interval="Wilson score, 95%", acc=_rate(sum(r["correct"] for r in ok), len(ok)),
                 acc_norm=_rate(sum(r["correct_norm"] for r in ok), len(ok)),
                 chance=float(np.mean([1 / len(r["loglik"]) for r in ok])) if ok else None)
    elif task == "moderate":
        pos, neg = MODERATION_LABELS[1], MODERATION_LABELS[0]
        tp = sum(r["label"] == pos and r["pred"] == pos for r in ok)
        fp = sum(r["label"] == neg and r["pred"] == pos for r in ok)
        fn = sum(r["label"] == pos and r["pred"] == neg for r in ok)
        s.update(interval="Wilson score, 95%", positive_class=pos,
                 confusion={"tp": tp, "fp": fp, "fn": fn, "tn": len(ok) - tp - fp - fn},
                 precision=_rate(tp, tp + fp), recall=_rate(tp, tp + fn),
                 accuracy=_rate(sum(r["correct"] for r in ok), len(ok)),
                 positive_rate=(tp + fn) / len(ok) if ok else None)
    elif task == "generate":
        tgt = [r for r in ok if "exact_match" in r]
        s.update(completion_tokens=sum(r["n_completion_tokens"] for r in ok),
                 with_target=len(tgt))
        if tgt:
            s.update(interval="Wilson score, 95%", exact_match=_rate(sum(r["exact_match"] for r in tgt), len(tgt)))
    return s


def timing(start: float, examples: int, tokens: int) -> dict[str, float]:
    dt = max(time.perf_counter() - start, 1e-9)
    return {"seconds": dt, "examples_per_s": examples / dt, "tokens_per_s": tokens / dt}

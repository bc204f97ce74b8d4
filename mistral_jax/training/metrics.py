"""Training metrics: the run's metrics.jsonl (one record per log step), log records and the loss-curve plot."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

from mistral_jax.model import flops
from mistral_jax.runtime.files import read_jsonl, write_atomic

Record = dict[str, Any]


def _parse_lines(path: Path) -> tuple[list[Record], list[int]]:
    """(records, 1-based numbers of lines that are not a JSON record with an integer 'step'); blank lines
    skipped."""
    records, bad = [], []
    for n, rec, why in read_jsonl(path):
        if why is None and isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
        else:
            bad.append(n)
    return records, bad


def read_metrics(path: str | Path) -> list[Record]:
    """metrics.jsonl records, the last one per step, in step order; lines that do not parse (a write torn
    by a kill) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    by_step = {rec["step"]: rec for rec in _parse_lines(path)[0]}
    return [by_step[k] for k in sorted(by_step)]


class MetricsLog:
    """Appends one JSON record per line to a run's metrics.jsonl; `fresh` and `resume` prepare the file."""

    def __init__(self, path: Path | None):
        self.path = path
        self._file = open(path, "a") if path is not None else None

    @classmethod
    def null(cls) -> "MetricsLog":
        """A log that writes nothing (processes other than process 0)."""
        return cls(None)

    @classmethod
    def fresh(cls, path: str | Path) -> tuple["MetricsLog", list[str]]:
        """A new, empty log for a run that starts from step 0. An existing file (an earlier run in the same
        folder) is moved aside to metrics.old-<n>.jsonl, so its records do not mix into this run's."""
        path = Path(path)
        notes = []
        if path.exists() and path.stat().st_size > 0:
            n = 1
            while (aside := path.with_name(f"{path.stem}.old-{n}{path.suffix}")).exists():
                n += 1
            os.replace(path, aside)
            notes.append(f"metrics: moved {path.name} of an earlier run (no checkpoint) aside to {aside.name}")
        path.write_text("")
        return cls(path), notes

    @classmethod
    def resume(cls, path: str | Path, step: int) -> tuple["MetricsLog", list[str]]:
        """The log of a run resumed at checkpoint `step`: records after `step` (they will be redone) and lines
        that do not parse (a torn last write) are dropped, with a note each; the file is rewritten atomically."""
        path = Path(path)
        notes = []
        if path.is_file():
            records, bad = _parse_lines(path)
            if bad:
                notes.append(f"metrics: dropped {len(bad)} unreadable line(s) of {path.name} (line(s) "
                             f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}; a write torn "
                             "by a kill)")
            kept = [r for r in records if r["step"] <= step]
            if len(kept) < len(records):
                notes.append(f"metrics: dropped {len(records) - len(kept)} record(s) after checkpoint step "
                             f"{step}; those steps are redone")
            if bad or len(kept) < len(records):
                write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        return cls(path), notes

    def write(self, record: Record) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def log_record(step: int, since_log: Sequence[dict[str, Any]], rows_per_step: int, seq_len: int,
               flops_per_token: float, peak_flops: float) -> Record:
    """One metrics record summarising the steps since the last one.

    since_log: per step {'loss', 'grad_norm', 'lr', 'tokens' (predicted tokens), 'dt' (s), 'timed' (False
    for a step that included compilation)}. Throughput counts all row positions processed; MFU is
    against `peak_flops`.
    """
    timed = [w for w in since_log if w["timed"]]
    seconds = sum(w["dt"] for w in timed)
    loss_tokens_per_s = sum(w["tokens"] for w in timed) / seconds if timed else None
    tokens_per_s = len(timed) * rows_per_step * seq_len / seconds if timed else None
    return {
        "step": step,
        "loss": sum(w["loss"] for w in since_log) / len(since_log),
        "lr": since_log[-1]["lr"],
        "grad_norm": since_log[-1]["grad_norm"],
        "tokens_per_s": tokens_per_s,
        "loss_tokens_per_s": loss_tokens_per_s,
        "mfu": flops.mfu(tokens_per_s, flops_per_token, peak_flops) if tokens_per_s else None,
        "time": time.time(),
    }


def plot_loss_curve(records: Sequence[Record], path: str | Path, title: str = "training loss") -> None:
    """Writes a PNG of loss against step."""
    import matplotlib   # imported here for start-up time: only the end of a run plots (and needs "Agg" first)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class ScalarSinks:
    """TensorBoard event files (tensorboardX) in `tb_dir` and, when `wandb_project` is given, a Weights &
    Biases run (its files under `wandb_dir`/wandb; `run_id` continues that run, e.g. on resume: see
    `wandb_run_id`); each log record's numeric fields become scalars at its step. Either may be off.
    wandb's own settings apply (WANDB_MODE=offline: no network, the run stays in the folder)."""

    def __init__(self, tb_dir: str | Path | None, wandb_project: str = "", run_name: str = "",
                 config: dict[str, Any] | None = None, wandb_dir: str | Path | None = None,
                 run_id: str | None = None):
        self._tb = self._wandb = None
        if tb_dir is not None:
            from tensorboardX import SummaryWriter   # imported here for start-up time: only when it writes
            self._tb = SummaryWriter(logdir=str(tb_dir), flush_secs=10)
        if wandb_project:
            try:
                import wandb   # optional: installed only by those who log to Weights & Biases
            except ImportError:
                raise ImportError("train.wandb_project is set but the 'wandb' package is not installed "
                                  "(pip install wandb), or leave train.wandb_project empty") from None
            try:
                self._wandb = wandb.init(project=wandb_project, name=run_name or None, config=config or {},
                                         dir=str(wandb_dir) if wandb_dir else None, id=run_id,
                                         resume="allow" if run_id else None, settings=wandb.Settings(console="off"))
            except Exception as e:   # wandb raises its own types (no API key, unreachable server, bad settings)
                self.close()
                raise RuntimeError(f"train.wandb_project {wandb_project!r}: wandb.init failed "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None

    def write(self, record: Record, prefix: str = "train/") -> None:
        scalars = {k: float(v) for k, v in record.items()
                   if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(prefix + k, v, record["step"])
        if self._wandb is not None:
            self._wandb.log({prefix + k: v for k, v in scalars.items()}, step=record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def wandb_run_id(run_dir: Path, resumed: bool) -> str:
    """The W&B run id of a run directory, kept in <run dir>/wandb_id: a resumed run continues the run its
    first part logged to; a fresh run (also one in a folder an earlier run used) gets a new id."""
    path = run_dir / "wandb_id"
    if resumed and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = os.urandom(6).hex()
    write_atomic(path, run_id)
    return run_id

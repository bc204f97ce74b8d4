"""Benchmark: the Mistral-7B story end to end at 7B shapes, from random bf16 weights, through the public CLIs.

    python bench/bench_7b.py [--shape 7b|tiny] [--workdir /tmp/bench7b] [--keep] [--stages a,b,...]
        [--out BENCHMARKS.md] [--timeout SECONDS] [--seq-len 512]

Each stage runs in its own process; its wall time and peak RSS are read from the OS for that one process
(`os.wait4` on the child: ru_maxrss of that child alone, not the cumulative maximum over all children that
`getrusage(RUSAGE_CHILDREN)` would give). Stages, in the order they run:

  write-hf         random bf16 weights (std 0.02, norm scales 1 + 0.02 noise) in the Hugging Face layout: 4
                   safetensors shards, model.safetensors.index.json, config.json of the preset; written tensor by
                   tensor with mistral_jax.checkpoint.torch_write.write_safetensors (`python bench/bench_7b.py --stage
                   write-hf`). Skipped with --keep when the folder is complete and matches the shape.
  convert          python -m infer.convert HF NATIVE --dtype bfloat16
  parity-ours      last-position logits of one 64-token prompt, ours in bf16 (load_params + model.forward, from
                   NATIVE), written to an .npy (`python bench/bench_7b.py --stage parity-ours`)
  parity-hf        the same from transformers' MistralForCausalLM in bf16 (torch CPU) on the HF folder
                   (`--stage parity-hf`); the two run one after the other so that each fits in memory. The report
                   gives max|ours - hf| / max|hf| (target <= 2%).
  generate-b1      python -m infer.generate --checkpoint NATIVE, 1 prompt, --batch-size 1, 32 new tokens, bf16
  generate-b4      the same with 4 prompts and --batch-size 4
  perplexity       python -m infer.evaluate --task perplexity on a few stdlib module docstrings, bf16
  lora             python -m train.finetune: LoRA rank 16 on all 7 projections, bf16 compute and params, remat
                   full, 512-token rows, batch 1, 3 steps, one checkpoint (step 3), held-out eval / answers /
                   sample off; the run writes the merged export to RUN/export
  generate-export  python -m infer.generate from RUN/export (batch 1)
  resume           python -m train.finetune --resume of the same run with train.steps=4 (one more step)

`--stages` takes a comma list of these names (or the groups `generate` = generate-b1,generate-b4 and
`parity` = parity-ours,parity-hf); a stage whose input another stage makes needs that stage's output to be in
the workdir already (from an earlier run with --keep), else it is reported as skipped. A failed stage's exit
code and last stderr line are reported, and the stages that do not depend on it still run.

Memory limits are ratios to M, the model's bytes in bf16 (2 x parameters; 13.49 GiB at 7B): convert <= 1.10 M;
generate, perplexity and the parity forward <= M + 2 GiB; LoRA and resume <= M + 4 GiB; generating from the
merged export <= M + 2 GiB. At --shape tiny (mistral_jax/model/presets/tiny.json, a couple of minutes in all) the limits are
reported but mean nothing: the process's own footprint (jax, XLA, torch) dominates.

The results are appended as a new section (machine: CPU model, cores, RAM; date; versions) to --out
(default BENCHMARKS.md) and printed. Logs of every stage are kept in WORKDIR/logs.

RUN IT ALONE. At 7B the stages need up to about M + 4 GiB (17.5 GiB) of RAM each and the whole run takes up to
an hour on a 2-core, 24 GiB machine: anything else running at the same time distorts the timings and can push a
stage out of memory. It does not run in CI. Disk: the HF and native checkpoints and each merged export are about
M each (LoRA's train checkpoints hold only the adapters and their optimizer state: under 1% of M); without --keep
the HF folder is deleted once nothing later reads it and the first export once it has been generated from, which
keeps the peak near 3 x 14.5 GB (about 4 x with --keep: the resume writes a second export before the first goes). Without --keep (and without --stages) the workdir is cleared at the
start and at the end (but for its logs/); --keep leaves it in place for re-running later stages.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 2**30
SHAPES = {"7b": "mistral-7b-v0.1", "tiny": "tiny"}
PARITY_TOKENS = 64
PARITY_TARGET = 0.02
NEW_TOKENS = 32
SEQ_LEN = 512                # LoRA rows (batch 1)
STAGES = ("write-hf", "convert", "parity-ours", "parity-hf", "generate-b1", "generate-b4", "perplexity", "lora",
          "generate-export", "resume")
GROUPS = {"generate": ("generate-b1", "generate-b4"), "parity": ("parity-ours", "parity-hf"),
          "hf": ("write-hf",), "finetune": ("lora",)}
DEPENDS = {"convert": ("write-hf",), "parity-ours": ("convert",), "parity-hf": ("write-hf",),
           "generate-b1": ("convert",), "generate-b4": ("convert",), "perplexity": ("convert",),
           "lora": ("convert",), "generate-export": ("lora",), "resume": ("lora",)}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]
DOC_MODULES = ("json", "textwrap", "contextlib")   # stdlib module docstrings scored by the perplexity stage
DOC_CHARS = 1200


# ----- helpers shared by the stages -----

def model_cfg(shape: str) -> Any:
    from mistral_jax.model.config import ModelConfig
    return ModelConfig.preset(SHAPES[shape])


def model_bytes(cfg: Any) -> int:
    """M: bytes of the model's params in bf16, from the tensor shapes of the config."""
    from mistral_jax.checkpoint.weights import tensor_specs
    return sum(math.prod(s.shape) for s in tensor_specs(cfg, "hf")) * 2


@dataclass
class Paths:
    work: Path

    def __getattr__(self, name: str) -> Path:
        names = {"hf": "hf", "native": "native", "run": "lora", "export": "lora/export", "logs": "logs",
                 "prompts1": "prompts-b1.jsonl", "prompts4": "prompts-b4.jsonl", "docs": "docs.jsonl",
                 "ppl": "perplexity", "tokens": "parity_tokens.npy", "ours": "parity_ours.npy",
                 "theirs": "parity_hf.npy"}
        if name not in names:
            raise AttributeError(name)
        return self.work / names[name]


def hf_complete(hf: Path, cfg: Any) -> bool:
    """An HF folder this script wrote for `cfg`: config, index and every shard it names (atomic_dir makes the
    folder appear only once complete)."""
    try:
        conf = json.loads((hf / "config.json").read_text())
        index = json.loads((hf / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    want = cfg.to_hf_config()
    if any(conf.get(k) != v for k, v in want.items()):
        return False
    return all((hf / name).is_file() for name in set(index.get("weight_map", {}).values()))


# ----- child sub-commands (--stage NAME) -----

def write_hf(dst: Path, cfg: Any, n_shards: int = 4, seed: int = 0, std: float = 0.02) -> None:
    """Random bf16 weights in the HF layout, written tensor by tensor (values are slices of one random pool,
    so generating 7 B normals is not the bottleneck); the folder appears only when complete."""
    import ml_dtypes
    import numpy as np
    from mistral_jax.checkpoint.atomic import atomic_dir
    from mistral_jax.checkpoint.torch_write import write_safetensors
    from mistral_jax.checkpoint.weights import tensor_specs

    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 26, dtype=np.float32) * std).astype(ml_dtypes.bfloat16)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    specs = tensor_specs(cfg, "hf")
    shapes = {s.key: s.shape for s in specs}
    total = sum(math.prod(s.shape) for s in specs) * 2
    shards: list[list[tuple]] = [[] for _ in range(n_shards)]
    offset = 0
    for s in specs:  # balanced by bytes: a tensor goes to the shard its first byte falls in
        shards[min(n_shards - 1, offset * n_shards // total)].append((s.key, s.shape, bf16))
        offset += math.prod(s.shape) * 2
    shards = [s for s in shards if s]

    def tensor(key: str) -> np.ndarray:
        n = math.prod(shapes[key])
        start = int(rng.integers(0, pool.size))
        flat = np.roll(pool, -start)
        flat = flat[:n] if n <= flat.size else np.tile(flat, -(-n // flat.size))[:n]
        if key.endswith("norm.weight"):      # RMSNorm scales near 1, as in a trained model
            flat = (flat.astype(np.float32) + 1.0).astype(bf16)
        return flat.reshape(shapes[key])

    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with atomic_dir(dst, force=True) as tmp:
        for i, (name, entries) in enumerate(zip(names, shards)):
            t0 = time.perf_counter()
            write_safetensors(tmp / name, entries, tensor)
            print(f"wrote {name} ({len(entries)} tensors) in {time.perf_counter() - t0:.1f} s", flush=True)
        weight_map = {k: name for name, entries in zip(names, shards) for k, _, _ in entries}
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_config() | {"dtype": "bfloat16",
                                                                         "torch_dtype": "bfloat16"}, indent=1))


def parity_ours(p: Paths) -> None:
    """Last-position logits (float32) of the parity prompt from NATIVE in bf16, via model.forward."""
    import jax.numpy as jnp
    import numpy as np
    from mistral_jax.model import transformer as model
    from mistral_jax.checkpoint.native import load_params

    cfg, params = load_params(p.native, dtype=jnp.bfloat16, progress=False)
    tokens = np.load(p.tokens)
    t0 = time.perf_counter()
    logits = model.forward(params, jnp.asarray(tokens, jnp.int32)[None], cfg, dtype=jnp.bfloat16)
    last = np.asarray(logits[0, -1], np.float32)
    print(f"ours: forward of {tokens.size} tokens in {time.perf_counter() - t0:.1f} s (compilation included); "
          f"sliding_window {cfg.sliding_window}, rope_theta {cfg.rope_theta}", flush=True)
    np.save(p.ours, last)
    (p.work / "parity_ours.json").write_text(json.dumps({"sliding_window": cfg.sliding_window,
                                                         "rope_theta": cfg.rope_theta}))


def parity_hf(p: Paths) -> None:
    """The same logits from transformers' MistralForCausalLM in bf16 (torch CPU) on the HF folder."""
    import numpy as np
    import torch
    from transformers import MistralForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    try:
        m = MistralForCausalLM.from_pretrained(p.hf, dtype=torch.bfloat16, local_files_only=True,
                                               attn_implementation="eager")
    except TypeError:  # transformers 4: torch_dtype
        m = MistralForCausalLM.from_pretrained(p.hf, torch_dtype=torch.bfloat16, local_files_only=True,
                                               attn_implementation="eager")
    m.eval()
    c = m.config
    theta = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta")
    tokens = np.load(p.tokens)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = m(torch.as_tensor(tokens, dtype=torch.long)[None])
    last = out.logits[0, -1].float().numpy()
    print(f"hf: forward of {tokens.size} tokens in {time.perf_counter() - t0:.1f} s; dtype {m.dtype}, "
          f"sliding_window {c.sliding_window}, rope_theta {theta}", flush=True)
    np.save(p.theirs, last)
    (p.work / "parity_hf.json").write_text(json.dumps({"sliding_window": c.sliding_window, "rope_theta": theta}))


def run_substage(args: argparse.Namespace) -> int:
    p, cfg = Paths(Path(args.workdir)), model_cfg(args.shape)
    if args.stage == "write-hf":
        write_hf(p.hf, cfg)
    elif args.stage == "parity-ours":
        parity_ours(p)
    elif args.stage == "parity-hf":
        parity_hf(p)
    return 0


# ----- measuring a child -----

@dataclass
class Result:
    name: str
    limit: str = ""                       # e.g. "M + 2 GiB"
    limit_bytes: float | None = None
    cmd: list[str] = field(default_factory=list)
    rc: int | None = None                 # None: not run
    wall: float = 0.0
    peak: int = 0                         # bytes
    skipped: str = ""                     # reason when not run
    error: str = ""                       # last stderr line on failure
    info: str = ""                        # tokens/s, perplexity, parity, ...

    @property
    def ok(self) -> bool:
        return self.rc == 0


ERROR_RE = re.compile(r"^(error:|\w+(\.\w+)*(Error|Exception|Exit|Interrupt)\b|bench_7b: killed)")


def last_line(text: str) -> str:
    """The line of a log that says what went wrong: the last `error: ...` line or exception line of a
    traceback, else the last non-empty line (a progress bar's last redraw counts as a line)."""
    lines = [seg.strip() for line in text.splitlines() for seg in line.split("\r")]
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):
        if ERROR_RE.match(ln):
            return ln
    return lines[-1] if lines else ""


def measure(cmd: list[str], log: Path, timeout: float | None) -> tuple[int, float, int, str, str]:
    """Runs `cmd` from the repo root; (exit code, wall s, peak RSS bytes of that child, stdout, stderr)."""
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)  # this checkout first
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out_path, err_path = log.with_suffix(".stdout"), log.with_suffix(".stderr")
    t0 = time.perf_counter()
    with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                start_new_session=True)
        killed = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if timeout and not killed and time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)   # this child's own process group
                killed = True
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc          # reaped here, so Popen must not wait for it again
    out, err = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    if killed:
        err += f"\nbench_7b: killed after the --timeout of {timeout:.0f} s"
    return rc, wall, usage.ru_maxrss * 1024, out, err   # Linux: ru_maxrss in KiB


# ----- the driver -----

def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version
    vers = []
    for pkg in ("jax", "flax", "orbax-checkpoint", "torch", "transformers"):
        try:
            vers.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return f"{cpu}, {os.cpu_count()} cores, {ram / GiB:.1f} GiB RAM; python {platform.python_version()}, " + \
        ", ".join(vers)


def stdlib_docs(n_chars: int = DOC_CHARS) -> list[dict[str, str]]:
    docs = []
    for name in DOC_MODULES:
        text = (importlib.import_module(name).__doc__ or "").strip()
        if len(text) > n_chars:
            text = text[:n_chars].rsplit(None, 1)[0]
        docs.append({"id": name, "text": text})
    return docs


def parity_tokens(n: int) -> list[int]:
    """n token ids (BOS first) of real text: stdlib docstrings, Mistral's v1 tokenizer."""
    from mistral_jax.data.tokenizer import Tokenizer
    tok = Tokenizer.for_vocab(32000)
    text = " ".join((importlib.import_module(m).__doc__ or "") for m in ("argparse", "json", "collections"))
    ids = tok.encode(text, bos=True)[:n]
    if len(ids) < n:
        raise SystemExit(f"parity prompt: only {len(ids)} tokens of text")
    return ids


def finetune_cmd(p: Paths, shape: str, steps: int, resume: bool, seq_len: int = SEQ_LEN) -> list[str]:
    sets = [f"model.preset={SHAPES[shape]}", "model.dtype=bfloat16", "model.param_dtype=bfloat16",
            "model.remat=full", "lora.rank=16",   # lora.targets defaults to all 7 projections
            "data.source=chat-examples", "data.examples=200", f"data.seq_len={seq_len}", "data.batch_size=1",
            f"train.steps={steps}", "train.log_every=1", "train.progress=false", "train.tensorboard=false",
            "checkpoint.every=3", "checkpoint.keep=1",
            "eval.batches=0", "eval.answers=0", "eval.before=false", "eval.sample_tokens=0", "eval.export=true"]
    cmd = [sys.executable, "-m", "train.finetune", "--config", "configs/finetune-default.toml",
           "--init-from", str(p.native), "--run-dir", str(p.run)]
    if resume:
        cmd.append("--resume")
    for s in sets:
        cmd += ["--set", s]
    return cmd


def generate_cmd(ckpt: Path, prompts: Path, out: Path, batch: int) -> list[str]:
    return [sys.executable, "-m", "infer.generate", "--checkpoint", str(ckpt), "--prompts", str(prompts),
            "--output", str(out), "--overwrite", "--batch-size", str(batch), "--max-new-tokens", str(NEW_TOKENS),
            "--dtype", "bfloat16"]


GEN_RE = re.compile(r"generated (\d+) tokens for (\d+) prompts in ([\d.]+) s \(([\d.]+) tokens/s")


def gen_info(out: str, err: str) -> str:
    m = GEN_RE.search(err)
    return (f"{m.group(1)} tokens for {m.group(2)} prompt(s) in {float(m.group(3)):.1f} s: "
            f"{float(m.group(4)):.2f} tokens/s (compilation included)") if m else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--shape", choices=tuple(SHAPES), default="7b",
                    help="7b: mistral-7b-v0.1 shapes; tiny: mistral_jax/model/presets/tiny.json (validates the script)")
    ap.add_argument("--workdir", default="/tmp/bench7b",
                    help="working folder (at 7B about 45 GB of free disk, 60 GB with --keep)")
    ap.add_argument("--keep", action="store_true",
                    help="reuse the workdir (a complete HF checkpoint there skips write-hf) and leave it in place")
    ap.add_argument("--stages", default=None,
                    help=f"comma list of stages to run (default: all): {', '.join(STAGES)}; groups: "
                         f"{', '.join(GROUPS)}. Implies --keep")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file the section is appended to")
    ap.add_argument("--timeout", type=float, default=None, help="kill a stage after this many seconds")
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN,
                    help=f"LoRA row length in tokens (default {SEQ_LEN}, the issue's; lower it only if the run "
                         "does not fit the hour)")
    ap.add_argument("--stage", choices=("write-hf", "parity-ours", "parity-hf"), default=None,
                    help=argparse.SUPPRESS)      # internal: one child stage
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.stage:
        return run_substage(args)

    selected = list(STAGES)
    if args.stages:
        wanted = []
        for s in (x.strip() for x in args.stages.split(",") if x.strip()):
            if s not in STAGES and s not in GROUPS:
                ap.error(f"--stages: unknown stage {s!r}; known: {', '.join(STAGES)}; groups: {', '.join(GROUPS)}")
            wanted += GROUPS.get(s, (s,))
        selected = [s for s in STAGES if s in wanted]
        args.keep = True
    keep = args.keep
    cfg = model_cfg(args.shape)
    M = model_bytes(cfg)
    work = Path(args.workdir).resolve()
    p = Paths(work)
    if not keep and work.exists():
        if any(work.iterdir()) and not (work / "logs").is_dir():
            sys.exit(f"bench_7b: --workdir {work} is a non-empty folder this script did not make (no logs/); "
                     "refusing to clear it")
        shutil.rmtree(work)
    p.logs.mkdir(parents=True, exist_ok=True)
    need = (4 if keep else 3) * M   # see the module docstring (HF, native, the first and the resumed export)
    free = shutil.disk_usage(work).free
    print(f"bench_7b: shape {args.shape} ({SHAPES[args.shape]}), M = {M / GiB:.2f} GiB, workdir {work} "
          f"({free / 1e9:.0f} GB free, about {need / 1e9:.0f} GB needed at the peak)", flush=True)
    if free < need:
        print(f"bench_7b: warning: {free / 1e9:.0f} GB free in {work}, about {need / 1e9:.0f} GB needed", flush=True)
    started = datetime.datetime.now()
    host = machine()

    # inputs (cheap, written by this process)
    p.prompts1.write_text(json.dumps({"id": 0, "prompt": PROMPTS[0]}) + "\n")
    p.prompts4.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(PROMPTS)))
    docs = stdlib_docs()
    p.docs.write_text("".join(json.dumps(d) + "\n" for d in docs))
    import numpy as np
    np.save(p.tokens, np.asarray(parity_tokens(PARITY_TOKENS), np.int32))

    me = [sys.executable, str(Path(__file__).resolve()), "--shape", args.shape, "--workdir", str(work)]
    gib = lambda x: x * GiB  # noqa: E731
    limits = {"write-hf": ("", None), "convert": ("1.10 M", 1.10 * M), "parity-ours": ("M + 2 GiB", M + gib(2)),
              "parity-hf": ("", None), "generate-b1": ("M + 2 GiB", M + gib(2)),
              "generate-b4": ("M + 2 GiB", M + gib(2)), "perplexity": ("M + 2 GiB", M + gib(2)),
              "lora": ("M + 4 GiB", M + gib(4)), "generate-export": ("M + 2 GiB", M + gib(2)),
              "resume": ("M + 4 GiB", M + gib(4))}
    commands: dict[str, list[str]] = {
        "write-hf": me + ["--stage", "write-hf"],
        "convert": [sys.executable, "-m", "infer.convert", str(p.hf), str(p.native), "--dtype", "bfloat16", "--quiet"],
        "parity-ours": me + ["--stage", "parity-ours"],
        "parity-hf": me + ["--stage", "parity-hf"],
        "generate-b1": generate_cmd(p.native, p.prompts1, work / "gen-b1.jsonl", 1),
        "generate-b4": generate_cmd(p.native, p.prompts4, work / "gen-b4.jsonl", 4),
        "perplexity": [sys.executable, "-m", "infer.evaluate", "--checkpoint", str(p.native), "--task", "perplexity",
                       "--data", str(p.docs), "--output", str(p.ppl), "--overwrite", "--dtype", "bfloat16"],
        "lora": finetune_cmd(p, args.shape, 3, resume=False, seq_len=args.seq_len),
        "generate-export": generate_cmd(p.export, p.prompts1, work / "gen-export.jsonl", 1),
        "resume": finetune_cmd(p, args.shape, 4, resume=True, seq_len=args.seq_len),
    }
    before: dict[str, Callable[[], None]] = {
        "convert": lambda: shutil.rmtree(p.native, ignore_errors=True),
        "lora": lambda: shutil.rmtree(p.run, ignore_errors=True),
        "parity-ours": lambda: p.ours.unlink(missing_ok=True),
        "parity-hf": lambda: p.theirs.unlink(missing_ok=True),
    }
    inputs = {"convert": p.hf / "model.safetensors.index.json", "parity-ours": p.native, "parity-hf": p.hf,
              "generate-b1": p.native, "generate-b4": p.native, "perplexity": p.native, "lora": p.native,
              "generate-export": p.export, "resume": p.run / "checkpoints"}

    def info(name: str, out: str, err: str) -> str:
        """The stage's headline figures, read from its output files or its stderr summary line."""
        if name.startswith("generate"):
            return gen_info(out, err)
        if name == "perplexity":
            try:
                s = json.loads((p.ppl / "summary.json").read_text())
                return (f"{s['scored']} docs, {s['tokens']} tokens, perplexity {s['perplexity']:.4g}, "
                        f"{s['this_run']['tokens_per_s']:.1f} tokens/s (compilation included)")
            except (OSError, ValueError, KeyError, TypeError):
                return ""
        if name in ("lora", "resume"):
            try:
                s = json.loads((p.run / "summary.json").read_text())
                recs = [json.loads(x) for x in (p.run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            except (OSError, ValueError):
                return ""
            first = 0 if name == "lora" else 3          # the steps this process ran
            timed = [r["tokens_per_s"] for r in recs if r["step"] > first and r.get("tokens_per_s")]
            ran = [r for r in recs if r["step"] > first]
            speed = (f"{args.seq_len / timed[-1]:.1f} s/step ({timed[-1]:.1f} tokens/s) after the first step"
                     if timed else f"{len(ran)} step(s), the first of a process includes compilation: no step time")
            ckpts = sorted(d.name for d in (p.run / "checkpoints").iterdir() if d.name.isdigit()) \
                if (p.run / "checkpoints").is_dir() else []
            return (f"at step {s.get('steps')}, loss {s.get('final_train_loss', float('nan')):.4f}; {speed}; "
                    f"checkpoints {ckpts}; merged export "
                    + (f"W/{Path(s['export']).relative_to(work)}" if s.get("export") else "-"))
        if name == "write-hf":
            n = len(list(p.hf.glob("*.safetensors")))
            size = sum(f.stat().st_size for f in p.hf.glob("*.safetensors"))
            return f"{n} shards, {size / 1e9:.2f} GB"
        if name == "convert":
            size = sum(f.stat().st_size for f in p.native.rglob("*") if f.is_file()) if p.native.is_dir() else 0
            return f"native {size / 1e9:.2f} GB"
        return ""

    results: dict[str, Result] = {}
    failed: set[str] = set()
    for name in selected:
        label, lim = limits[name]
        r = results[name] = Result(name, label, lim, commands[name])
        deps = [d for d in DEPENDS.get(name, ()) if d in failed]
        if deps:
            r.skipped = f"skipped: needs {', '.join(deps)}, which failed"
            failed.add(name)
        elif name == "write-hf" and keep and hf_complete(p.hf, cfg):
            r.skipped = "skipped: complete HF checkpoint kept (--keep)"
        elif name in inputs and not any(d in selected for d in DEPENDS.get(name, ())) and not inputs[name].exists():
            r.skipped = f"skipped: input {inputs[name]} missing"
            failed.add(name)
        if r.skipped:
            print(f"[{name}] {r.skipped}", flush=True)
            continue
        if name in before:
            before[name]()
        print(f"[{name}] running: {shlex.join(r.cmd)}", flush=True)
        r.rc, r.wall, r.peak, out, err = measure(r.cmd, p.logs / name, args.timeout)
        if r.rc != 0:
            r.error = last_line(err) or last_line(out)
            failed.add(name)
        r.info = info(name, out, err) if r.rc == 0 else ""
        if r.rc == 0 and name.startswith("parity"):
            r.info = out.strip().splitlines()[-1] if out.strip() else ""
        verdict = "" if lim is None else ("within" if r.peak <= lim else "OVER") + f" {label}"
        print(f"[{name}] exit {r.rc}, {r.wall:.1f} s, peak RSS {r.peak / GiB:.2f} GiB = {r.peak / M:.2f} M"
              + (f" ({verdict})" if verdict else "") + (f"; {r.info}" if r.info else "")
              + (f"; error: {r.error}" if r.error else ""), flush=True)
        # disk hygiene without --keep: drop what no later stage reads
        if not keep and name == "parity-hf":
            shutil.rmtree(p.hf, ignore_errors=True)
        if not keep and name == "generate-export" and "resume" in selected:
            shutil.rmtree(p.export, ignore_errors=True)

    parity = ""
    if "parity-ours" in results or "parity-hf" in results:
        if p.ours.is_file() and p.theirs.is_file() and not {"parity-ours", "parity-hf"} & failed:
            ours, theirs = np.load(p.ours), np.load(p.theirs)
            diff = float(np.max(np.abs(ours - theirs)))
            scale = float(np.max(np.abs(theirs)))
            ratio = diff / scale if scale else float("inf")
            cfgs = [json.loads((work / f).read_text()) for f in ("parity_ours.json", "parity_hf.json")]
            same = cfgs[0]["sliding_window"] == cfgs[1]["sliding_window"] and \
                float(cfgs[0]["rope_theta"]) == float(cfgs[1]["rope_theta"])
            parity = (f"max|ours - hf| = {diff:.4g}, max|hf| = {scale:.4g}: ratio {ratio:.2%} "
                      f"({'PASS' if ratio <= PARITY_TARGET else 'FAIL'}, target <= {PARITY_TARGET:.0%}); argmax "
                      f"{'equal' if int(np.argmax(ours)) == int(np.argmax(theirs)) else 'differs'}; configs "
                      f"{'equal' if same else 'DIFFER: ' + json.dumps(cfgs)} (window {cfgs[1]['sliding_window']}, "
                      f"rope_theta {cfgs[1]['rope_theta']})")
        else:
            parity = "not computed (a parity stage failed or was not run)"
        print(f"[parity] {parity}", flush=True)

    section = report(args, cfg, M, host, started, results, parity, work, docs)
    print("\n" + section)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prev = out.read_text() if out.is_file() else ""
    out.write_text(prev.rstrip("\n") + ("\n\n" if prev.strip() else "") + section)
    print(f"bench_7b: section appended to {out}", flush=True)
    if not keep:    # everything but the logs
        for entry in work.iterdir():
            if entry != p.logs:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        print(f"bench_7b: workdir cleared; stage logs kept in {p.logs}", flush=True)
    bad = [r for r in results.values() if r.rc not in (0, None) or (r.skipped and "(--keep)" not in r.skipped)]
    return 1 if bad else 0


def report(args: argparse.Namespace, cfg: Any, M: int, host: str, started: datetime.datetime,
           results: dict[str, Result], parity: str, work: Path, docs: list[dict[str, str]]) -> str:
    n_params = M // 2
    tiny = args.shape != "7b"
    lines = [f"## Mistral-7B end to end (`bench/bench_7b.py --shape {args.shape}`, {started:%Y-%m-%d})", "",
             f"Machine: {host}. Started {started:%Y-%m-%d %H:%M}.",
             f"Model: {SHAPES[args.shape]} shapes ({cfg.n_layers} layers, dim {cfg.dim}, {n_params / 1e9:.3g} B "
             f"params), random bf16 weights (std 0.02; norm scales 1 + 0.02 noise); M = model bytes in bf16 = "
             f"{M / GiB:.2f} GiB. Each stage is one process; wall time includes start-up, loading (with checksum "
             f"verification) and compilation; peak RSS is that process's own ru_maxrss (`os.wait4`).", ""]
    if tiny:
        lines += ["**Tiny shape: a validation run of the script; the memory limits are meaningless here (the "
                  "processes' own footprint dominates).**", ""]
    lines += ["| # | stage | wall s | peak RSS GiB | RSS / M | limit | memory | result |",
              "| --- | --- | ---: | ---: | ---: | --- | --- | --- |"]
    for i, r in enumerate(results.values(), 1):
        if r.skipped:
            lines.append(f"| {i} | {r.name} | - | - | - | {r.limit or '-'} | - | {r.skipped} |")
            continue
        over = r.limit_bytes is not None and r.peak > r.limit_bytes
        mem = "FAIL" if over else "-" if r.limit_bytes is None or not r.ok else "pass"  # no verdict on a failed run
        error = r.error if len(r.error) <= 300 else r.error[:297] + "..."
        res = r.info if r.ok else f"FAILED (exit {r.rc}): {error}"
        lines.append(f"| {i} | {r.name} | {r.wall:.1f} | {r.peak / GiB:.2f} | {r.peak / M:.2f} | "
                     f"{r.limit or '-'} | {mem} | {res.replace('|', '/')} |")
    total = sum(r.wall for r in results.values())
    lines += ["", f"Total stage wall time {total / 60:.1f} min."]
    if parity:
        lines += ["", f"Parity (one {PARITY_TOKENS}-token prompt, last-position logits, bf16 both): {parity}."]
    lines += ["", f"Commands (W = {work}; perplexity data: the docstrings of {', '.join(d['id'] for d in docs)}, "
                  f"first {DOC_CHARS} characters each):", ""]
    for i, r in enumerate(results.values(), 1):
        cmd = shlex.join(r.cmd).replace(str(work), "W").replace(sys.executable, "python") \
            .replace(str(Path(__file__).resolve()), "bench/bench_7b.py")
        lines.append(f"{i}. {r.name}: `{cmd}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Perplexity scoring throughput: `infer.evaluate --task perplexity` (its Scorer) vs HF PyTorch forward.

    python bench/bench_eval.py [--max-length 1024 --batch 8 --data mistral_jax/evaluation/tasks/stdlib_docs.jsonl]
    python bench/bench_eval.py --stdlib-docstrings 150     # a larger set: 150 module docstrings

--stdlib-docstrings N replaces --data with the module docstrings of the first N (sorted by path) standard-
library source files whose docstring has at least 400 characters, read with `ast` (nothing is imported).

Same model (the 57M config of bench_train.py: dim 512, 8 layers, 8 q / 2 kv heads, head_dim 64, hidden 1536,
vocab 32000, random weights, float32 on both sides: HF gets our weights through `write_hf`), same data
(each document BOS + its tokens, split by the rolling rule `scoring.rolling_windows` into the same
(tokens, n_score) requests on both sides), in one process. Scored tokens = every document token after BOS.

Rows: our Scorer (requests packed as segments into rows of 256 positions or their length bucket, one jit
program per (rows, length); the head only at scored positions) on its first pass (compilation included) and
the median of --repeats compiled passes; the CLI `infer.evaluate` run in-process on a saved native checkpoint
(loading, tokenisation, compilation and output writing included); HF MistralForCausalLM eager forward +
float32 log-softmax + gather, batch 1 (no padding) and batches of --batch length-sorted requests padded to
the longest in the batch, each the median of --repeats passes after a warm-up call. Also checks that both
sides' per-token log-probabilities agree.

Same-XLA reference: when /work/venvs/hfflax/bin/python exists (or --hf-flax-python PATH), the same HF
folder and the same requests go to bench/hf_flax_ref.py (`score` mode) in that venv: transformers 4.57's
FlaxMistralForCausalLM, jitted forward + float32 log-softmax + gather, batches of --batch length-sorted
requests right-padded to the longest rounded up to 64 (one program per length); rows for its first pass
(compilation included) and compiled pass, and ours / HF Flax for the compiled passes. Without the venv
the row says "not run (no venv)".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mistral_jax.model import transformer as model_lib  # noqa: E402
from mistral_jax.inference import scoring  # noqa: E402
from mistral_jax.model.config import ModelConfig  # noqa: E402
from mistral_jax.data.tokenizer import Tokenizer  # noqa: E402
from mistral_jax.evaluation.lm_eval_tasks import TASKS_DIR  # noqa: E402

import hf_flax_ref  # noqa: E402  (bench/, the script's own folder, is on sys.path)
import ref_venv  # noqa: E402

CFG_57M = ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1536,
                      vocab_size=32000, sliding_window=4096, max_seq_len=4096)


def requests_for(texts: list[str], tok: Tokenizer, max_input: int, overlap: int) -> tuple[list, int]:
    """(rolling-window requests of all documents, scored token count)."""
    reqs, n = [], 0
    for text in texts:
        ids = tok.encode(text, bos=True)
        n += len(ids) - 1
        reqs += [(ids[w.start:w.end], w.n_score) for w in scoring.rolling_windows(len(ids), max_input, overlap)]
    return reqs, n


def stdlib_docstrings(n: int) -> list[str]:
    """Module docstrings (>= 400 chars) of the first n standard-library .py files, sorted by path."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if len(texts) == n:
            break
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            doc = ast.get_docstring(ast.parse(path.read_bytes()))
        except (SyntaxError, ValueError, OSError):
            continue
        if doc and len(doc) >= 400:
            texts.append(doc)
    return texts


def hf_score(hf, reqs: list, batch: int) -> list[np.ndarray]:
    """Per-request scored log-probs from HF: length-sorted batches, right-padded to the batch's longest."""
    import torch

    out: list[np.ndarray | None] = [None] * len(reqs)
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][0]))
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            L = max(len(reqs[i][0]) - 1 for i in idx)
            inp = torch.zeros((len(idx), L), dtype=torch.long)
            att = torch.zeros((len(idx), L), dtype=torch.long)
            for r, i in enumerate(idx):
                t = reqs[i][0][:-1]
                inp[r, :len(t)] = torch.tensor(t)
                att[r, :len(t)] = 1
            logits = hf(input_ids=inp, attention_mask=att).logits.float()
            lp = torch.log_softmax(logits, -1)
            for r, i in enumerate(idx):
                t, n = reqs[i]
                L_i = len(t) - 1
                tgt = torch.tensor(t[1:])
                out[i] = lp[r, torch.arange(L_i - n, L_i), tgt[L_i - n:]].numpy()
    return out  # type: ignore[return-value]


def timed(fn, repeats: int = 1):
    """(fn's last result, median wall time of `repeats` calls)."""
    results = []
    dt = ref_venv.median_time(lambda: results.append(fn()), repeats)
    return results[-1], dt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=TASKS_DIR / "stdlib_docs.jsonl")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--stdlib-docstrings", type=int, default=0, metavar="N")
    p.add_argument("--skip-cli", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="compiled passes (ours, HF PyTorch) timed; the median")
    hf_flax_ref.REFERENCE.add_cli_option(p)
    args = p.parse_args()

    import torch
    from transformers import MistralForCausalLM

    from mistral_jax.checkpoint.native import save_params
    from mistral_jax.checkpoint.torch_write import write_hf

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = CFG_57M
    tok = Tokenizer.for_vocab(cfg.vocab_size)
    tmp_data = None
    if args.stdlib_docstrings:
        texts = stdlib_docstrings(args.stdlib_docstrings)
        tmp_data = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
        tmp_data.write("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp_data.close()
        args.data = Path(tmp_data.name)
    else:
        texts = [json.loads(x)["text"] for x in args.data.read_text().splitlines() if x.strip()]
    overlap = scoring.default_overlap(cfg, args.max_length)
    reqs, n_scored = requests_for(texts, tok, args.max_length, overlap)
    n_fed = sum(len(t) - 1 for t, _ in reqs)
    params = jax.device_get(model_lib.init_params(cfg, jax.random.PRNGKey(0)))

    rows = []
    sc = scoring.Scorer(params, cfg, batch_size=args.batch, max_input=args.max_length)
    first, dt = timed(lambda: sc.score(reqs))
    rows.append((f"Scorer (infer.evaluate), batch {args.batch}, first pass incl. compile", dt))
    ours, dt = timed(lambda: sc.score(reqs), args.repeats)
    rows.append((f"Scorer (infer.evaluate), batch {args.batch}, compiled", dt))
    buckets = sorted(sc.used_buckets)
    padded = sc.positions_run // (1 + args.repeats)
    shapes = sorted(sc.used_shapes)

    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_cli:
            from mistral_jax.cli import evaluate as cli
            save_params(Path(tmp) / "ckpt", cfg, params)
            _, dt = timed(lambda: cli.main(["--checkpoint", str(Path(tmp) / "ckpt"), "--task", "perplexity",
                                            "--data", str(args.data), "--output", str(Path(tmp) / "out"),
                                            "--batch-size", str(args.batch), "--max-length", str(args.max_length)]))
            summ = json.loads((Path(tmp) / "out/summary.json").read_text())
            assert summ["tokens"] == n_scored, (summ["tokens"], n_scored)
            rows.append((f"`infer.evaluate --task perplexity` in-process, batch {args.batch} (load, compile, I/O "
                         "included)", dt))
        write_hf(Path(tmp) / "hf", cfg, params, progress=False)
        hf = MistralForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32,
                                                attn_implementation="eager").eval()
        hf_score(hf, reqs[:1], 1)   # warm-up
        theirs1, dt = timed(lambda: hf_score(hf, reqs, 1), args.repeats)
        rows.append(("HF MistralForCausalLM (PyTorch eager), batch 1", dt))
        theirsB, dt = timed(lambda: hf_score(hf, reqs, args.batch), args.repeats)
        rows.append((f"HF MistralForCausalLM (PyTorch eager), batch {args.batch} padded to longest", dt))
        flax_py = hf_flax_ref.REFERENCE.find_python(args.hf_flax_python)
        ref: dict | str = ref_venv.NOT_RUN
        if flax_py is not None:
            (Path(tmp) / "requests.json").write_text(json.dumps([[list(t), n] for t, n in reqs]))
            ref = hf_flax_ref.REFERENCE.run(flax_py, "score", Path(tmp) / "hf", "--requests",
                                          str(Path(tmp) / "requests.json"), "--batch", str(args.batch),
                                          "--pad-to", "64")

    if tmp_data is not None:
        os.unlink(tmp_data.name)
    diff = max(float(np.abs(a.logprobs - b).max()) for a, b in zip(ours, theirs1))
    best_hf = min(dt for name, dt in rows if name.startswith("HF"))
    flax_note = f"HF Flax (jit): {ref}"
    if isinstance(ref, dict):
        fdiff = max(float(np.abs(a.logprobs - np.array(b)).max()) for a, b in zip(ours, ref["logprobs"]))
        label = (f"HF Flax (jit) FlaxMistralForCausalLM, transformers {ref['transformers']}, batch {args.batch} "
                 f"padded to a multiple of 64")
        rows.append((f"{label}, first pass incl. compile", ref["first_pass_s"]))
        rows.append((f"{label}, compiled", ref["compiled_s"]))
        ours_compiled = next(dt for name, dt in rows if name.startswith("Scorer") and name.endswith("compiled"))
        flax_note = (f"HF Flax (jit): programs {ref['shapes']}; max |log-prob difference| vs ours {fdiff:.1e}; "
                     f"ours / HF Flax scored tokens/s (compiled passes, same run) "
                     f"{ref['compiled_s'] / ours_compiled:.2f}x")
    source = (f"{args.stdlib_docstrings}-module stdlib docstring set" if args.stdlib_docstrings
              else args.data.name)
    print(f"\n{len(texts)} documents of {source}: {n_scored} scored tokens, {len(reqs)} windows "
          f"(--max-length {args.max_length}, overlap {overlap}), {n_fed} tokens fed; our row lengths {buckets}, "
          f"(rows, length) programs {shapes}, {padded} positions run ({n_fed / padded:.0%} used); "
          f"max |log-prob difference| vs HF {diff:.1e}")
    print(f"Model: 57M Mistral (dim 512, 8 layers, 8q/2kv, hidden 1536, vocab 32000), float32; "
          f"{os.cpu_count()} CPU threads, torch {torch.__version__}, jax {jax.__version__}\n")
    print("| implementation | seconds | scored tokens/s | vs best HF |")
    print("| --- | ---: | ---: | ---: |")
    for name, dt in rows:
        print(f"| {name} | {dt:.2f} | {n_scored / dt:.0f} | {best_hf / dt:.2f}x |")
    if not isinstance(ref, dict):
        print(f"| HF Flax (jit) FlaxMistralForCausalLM | {ref} | - | - |")
    print(f"\n{flax_note}")


if __name__ == "__main__":
    main()

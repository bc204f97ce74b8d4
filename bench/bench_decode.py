"""Decode throughput of mistral_jax.inference.decode.generate vs Hugging Face `generate` on this CPU, and cache bytes.

Both run greedy decoding of the same random-weight model (float32) from the same prompts; the
first (compiling) call of each JAX shape is a warm-up and is not timed; then --rounds (default 3) calls of
ours and of HF generate alternate, and the medians are reported (a change of load hits both alike). Also counts the jit programs
compiled for 20 prompts of 20 different lengths (length buckets on, then off). Prints markdown tables.

Default shape only: the same-XLA reference. When /work/venvs/hfflax/bin/python exists (or
--hf-flax-python PATH), the same weights are written as an HF folder and bench/hf_flax_ref.py times
transformers 4.57's FlaxMistralForCausalLM `generate` under jax.jit in that venv (same prompts: the same
RandomState(0) draws; median of 3 calls after a compiling one). Extra columns: its call tokens/s, ours /
HF Flax (medians of 3 calls on both sides), greedy-token agreement with ours, and the decode step of
both ((t(call of n) - t(call of 1)) / (n - 1); ours measured the same way in this run). Without the venv the column says
"not run (no venv)". The same for EasyDeL 0.3.0 (its own jax) when /work/venvs/easydel/bin/python exists (or
--easydel-python PATH): bench/easydel_ref.py times its `generate` under jax.jit.

    python bench/bench_decode.py [--dim 512 --layers 8 --new 128 --batches 1 8]

`--shape 7b-layers [--dtype bfloat16|float32]`: Mistral-7B layer shapes (dim 4096, 32q/8kv heads of 128,
hidden 14336, vocab 32000, window 4096) with 4 layers, batch 1: decode tokens/s of ours and of HF
PyTorch (same random weights, same dtype) side by side, and the share of the memory-bandwidth roofline
(bytes one decode step must read: every parameter but the embedding table, plus one embedding row and
the filled cache slots; bandwidth: the best of numpy and jax summing a 512 MiB float32 array, measured in
the same run). A decode step's time is (time of a call generating 1 + n tokens - time generating 1) / n,
which removes prefill and call overhead (the same jit program serves both: output lengths are bucketed).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mistral_jax.model import cache as kv_cache  # noqa: E402
from mistral_jax.inference import decode
from mistral_jax.checkpoint import weights  # noqa: E402
from mistral_jax.model.config import ModelConfig  # noqa: E402


import easydel_ref  # noqa: E402  (bench/, the script's own folder, is on sys.path)
import hf_flax_ref  # noqa: E402
import ref_venv  # noqa: E402


def compile_count_table(params, cfg, new: int, max_len: int, seed: int = 1) -> None:
    """Programs compiled for 20 prompts of 20 different lengths, one call each, buckets on vs off."""
    rs = np.random.RandomState(seed)
    lengths = sorted(rs.choice(np.arange(2, max_len + 1), 20, replace=False).tolist())
    prompts = [rs.randint(3, cfg.vocab_size, n).tolist() for n in lengths]
    print(f"\nPrompt lengths: {lengths}; {new} new tokens each, batch 1, one call per prompt.\n")
    print("| length buckets | programs compiled | wall time of the 20 calls (s) |")
    print("|---|---|---|")
    for label, smallest in (("on (64, 128, 256, ...)", decode.SMALLEST_BUCKET), ("off (exact lengths)", None)):
        before, t0 = decode.compiled_programs(), time.perf_counter()
        for p in prompts:
            decode.generate(params, cfg, [p], new, eos_id=-1, bucket_smallest=smallest)
        print(f"| {label} | {decode.compiled_programs() - before} | {time.perf_counter() - t0:.1f} |")


def read_bandwidth(nbytes: int = 1 << 29) -> tuple[float, str]:
    """Best read bandwidth (bytes/s) of numpy and jax summing a float32 array of nbytes, and how it was measured."""
    a = np.ones(nbytes // 4, np.float32)
    t_np = min(ref_venv.median_time(lambda: a.sum(), 5), ref_venv.median_time(lambda: a.sum(), 5))
    ja = jax.device_put(a)
    jsum = jax.jit(lambda x: x.sum())
    jsum(ja).block_until_ready()
    t_jax = ref_venv.median_time(lambda: jsum(ja).block_until_ready(), 5)
    how = (f"sum of a {nbytes >> 20} MiB float32 array: numpy {nbytes / t_np / 1e9:.1f} GB/s, "
           f"jax {nbytes / t_jax / 1e9:.1f} GB/s (median of 5; the better one is used)")
    return nbytes / min(t_np, t_jax), how


class _LazyNumpy(Mapping):
    """A torch state dict seen as numpy arrays of one dtype, converted one tensor at a time (bf16 exactly)."""
    def __init__(self, sd, dtype):
        self.sd, self.dtype = sd, dtype

    def __getitem__(self, k):
        return self.sd[k].float().numpy().astype(self.dtype, copy=False)

    def __iter__(self):
        return iter(self.sd)

    def __len__(self):
        return len(self.sd)


def _params_from_torch(sd, cfg, dtype):
    """Our params (jax arrays of dtype) from an HF state dict, holding at most one extra copy of the model."""
    tree = weights.state_dict_to_params(_LazyNumpy(sd, dtype), cfg, "hf", dtype=dtype)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    del tree
    out = []
    while leaves:
        out.append(jax.device_put(leaves.pop(0)))
    return jax.tree_util.tree_unflatten(treedef, out)


def main_7b_layers(a) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM
    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[a.dtype]
    jdt = jax.numpy.dtype(a.dtype)
    torch.manual_seed(0)
    hc = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, sliding_window=4096,
                       max_position_embeddings=32768, rms_norm_eps=1e-5)
    torch.set_default_dtype(tdt)
    hf = MistralForCausalLM(hc).eval()
    torch.set_default_dtype(torch.float32)
    cfg = ModelConfig.from_hf_config(hc.to_dict())
    params = _params_from_torch(hf.state_dict(), cfg, jdt)
    n_params = sum(p.numel() for p in hf.parameters())
    itemsize = jdt.itemsize
    bw, how = read_bandwidth()
    prompt = np.random.RandomState(0).randint(3, 32000, (1, a.prompt_len)).tolist()
    n = a.new

    def ours(k):
        return decode.generate(params, cfg, prompt, k, eos_id=-1, dtype=jdt)
    ours(1 + n)                                                            # compile (also serves k=1)
    t_ours_n, t_ours_1 = ref_venv.median_time(lambda: ours(1 + n), 3), ref_venv.median_time(lambda: ours(1), 3)
    toks = ours(1 + n)[0]

    def theirs(k):
        with torch.no_grad():
            return hf.generate(torch.tensor(prompt), max_new_tokens=k, min_new_tokens=k, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    theirs(2)
    t_hf_n, t_hf_1 = ref_venv.median_time(lambda: theirs(1 + n), 3), ref_venv.median_time(lambda: theirs(1), 3)
    hf_toks = theirs(1 + n)[0, a.prompt_len:].tolist()
    step_ours, step_hf = (t_ours_n - t_ours_1) / n, (t_hf_n - t_hf_1) / n
    emb = cfg.vocab_size * cfg.dim
    avg_filled = a.prompt_len + (1 + n) / 2
    cache_read = 2 * cfg.n_layers * avg_filled * cfg.n_kv_heads * cfg.head_dim * itemsize
    step_bytes = (n_params - emb + cfg.dim) * itemsize + cache_read
    roof = bw / step_bytes
    print(f"# decode at Mistral-7B layer shapes, {time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"torch {torch.__version__}")
    print(f"model: {n_params / 1e9:.3f}B params ({a.layers} layers of dim 4096, 32q/8kv x 128, hidden 14336, "
          f"vocab 32000, window 4096), {a.dtype}, batch 1, prompt {a.prompt_len} tokens, greedy")
    print(f"bandwidth: {bw / 1e9:.1f} GB/s ({how}); bytes per decode step {step_bytes / 1e9:.3f} GB "
          f"(params less the embedding table {(n_params - emb) * itemsize / 1e9:.3f} GB + cache "
          f"{cache_read / 1e6:.2f} MB) -> roofline {roof:.2f} tokens/s\n")
    print("| dtype | implementation | decode step (ms) | tokens/s | % of roofline | call of 1+n tokens (s) |")
    print("|---|---|---|---|---|---|")
    for name, st, tn in (("mistral-jax", step_ours, t_ours_n), ("HF PyTorch", step_hf, t_hf_n)):
        print(f"| {a.dtype} | {name} | {st * 1e3:.1f} | {1 / st:.2f} | {100 / st / roof:.0f}% | {tn:.2f} |")
    agree = np.mean(np.array(toks) == np.array(hf_toks))
    print(f"\nours / HF decode tokens/s: {step_hf / step_ours:.2f}x; greedy tokens equal to HF's: {agree:.0%} "
          f"(n = {n})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed calls of ours and of HF generate, alternating; medians are reported")
    ap.add_argument("--shape", choices=("bench", "7b-layers"), default="bench")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="7b-layers only")
    ap.add_argument("--skip-compile-count", action="store_true")
    hf_flax_ref.REFERENCE.add_cli_option(ap)
    easydel_ref.REFERENCE.add_cli_option(ap)
    a = ap.parse_args()
    if a.shape == "7b-layers":
        if a.layers == 8:
            a.layers = 4
        if a.prompt_len == 64:
            a.prompt_len = 16
        if a.new == 128:
            a.new = 16
        return main_7b_layers(a)

    import torch
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    hc = MistralConfig(vocab_size=a.vocab, hidden_size=a.dim, intermediate_size=a.hidden, num_hidden_layers=a.layers,
                       num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.dim // a.heads,
                       sliding_window=a.window, max_position_embeddings=65536, rms_norm_eps=1e-5)
    hf = MistralForCausalLM(hc).eval()
    cfg = ModelConfig.from_hf_config(hc.to_dict())
    params = jax.device_put(weights.state_dict_to_params(
        {k: v.numpy() for k, v in hf.state_dict().items()}, cfg, "hf"))
    n_params = sum(p.numel() for p in hf.parameters())
    rs = np.random.RandomState(0)
    print(f"# decode benchmark, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}")
    print(f"model: {n_params / 1e6:.1f}M params (dim {a.dim}, {a.layers} layers, {a.heads}q/{a.kv_heads}kv, "
          f"window {a.window}), prompt {a.prompt_len} tokens, {a.new} new tokens, greedy, float32\n")
    flax_py = hf_flax_ref.REFERENCE.find_python(a.hf_flax_python)
    ed_py = easydel_ref.REFERENCE.find_python(a.easydel_python)
    ref: dict | str = ref_venv.NOT_RUN
    ed_ref: dict | str = ref_venv.NOT_RUN
    if flax_py is not None or ed_py is not None:
        from mistral_jax.checkpoint.torch_write import write_hf
        args = ("--batches", *map(str, a.batches), "--prompt-len", str(a.prompt_len), "--new", str(a.new),
                "--seed", "0", "--repeats", "3", "--return-tokens")
        with tempfile.TemporaryDirectory(prefix="bench_decode_hf_") as tmp:
            write_hf(Path(tmp) / "hf", cfg, jax.device_get(params), progress=False, tokenizer=None)
            ref = hf_flax_ref.REFERENCE.run(flax_py, "decode", Path(tmp) / "hf", *args)
            ed_ref = easydel_ref.REFERENCE.run(ed_py, "decode", Path(tmp) / "hf", *args)
    flax_by_batch = {r["batch"]: r for r in ref["results"]} if isinstance(ref, dict) else {}
    ed_by_batch = {r["batch"]: r for r in ed_ref["results"]} if isinstance(ed_ref, dict) else {}
    print("| batch | mistral-jax tokens/s | HF generate tokens/s | tokens agree | HF Flax (jit) tokens/s "
          "| ours / HF Flax | Flax tokens agree | EasyDeL (jit) tokens/s | ours / EasyDeL | EasyDeL tokens agree "
          "| decode step ms: ours / HF Flax / EasyDeL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for b in a.batches:
        prompts = rs.randint(3, a.vocab, (b, a.prompt_len)).tolist()
        decode.generate(params, cfg, prompts, a.new, eos_id=-1)            # compile
        if not a.skip_hf:
            with torch.no_grad():
                hf.generate(torch.tensor(prompts), max_new_tokens=4, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
        # alternate the two, so that a change of load on this shared machine hits both alike
        t_ours_calls, t_hf_calls = [], []
        for _ in range(max(1, a.rounds)):
            t0 = time.perf_counter()
            ours = decode.generate(params, cfg, prompts, a.new, eos_id=-1)
            t_ours_calls.append(time.perf_counter() - t0)
            if not a.skip_hf:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    out = hf.generate(torch.tensor(prompts), max_new_tokens=a.new, min_new_tokens=a.new,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
                    t_hf_calls.append(time.perf_counter() - t0)
        t_ours = float(np.median(t_ours_calls))
        hf_tps, agree = float("nan"), "-"
        if not a.skip_hf:
            hf_tps = b * a.new / float(np.median(t_hf_calls))
            agree = f"{np.mean(np.array(ours) == out[:, a.prompt_len:].numpy()):.3f}"
        steps = "-"
        if b in flax_by_batch or b in ed_by_batch:
            decode.generate(params, cfg, prompts, 1, eos_id=-1)             # in case 1 token compiles
            t_ours_n = ref_venv.median_time(lambda: decode.generate(params, cfg, prompts, a.new, eos_id=-1), 3)
            t_ours_1 = ref_venv.median_time(lambda: decode.generate(params, cfg, prompts, 1, eos_id=-1), 3)
            step_ours = (t_ours_n - t_ours_1) / max(a.new - 1, 1)
            steps = " / ".join([f"{1e3 * step_ours:.2f}"] + [f"{1e3 * r[b]['step_s']:.2f}" if b in r else "-"
                                                             for r in (flax_by_batch, ed_by_batch)])
        cols = []
        for got, by_batch in ((ref, flax_by_batch), (ed_ref, ed_by_batch)):
            rx = by_batch.get(b)
            if rx is None:
                cols.append(f"{got if isinstance(got, str) else 'not run'} | - | -")
            else:
                rx_agree = np.mean(np.array(ours) == np.array(rx["tokens"]))
                cols.append(f"{rx['call_tokens_per_s']:.1f} | {b * a.new / t_ours_n / rx['call_tokens_per_s']:.2f}x | "
                            f"{rx_agree:.3f}")
        print(f"| {b} | {b * a.new / t_ours:.1f} | {hf_tps:.1f} | {agree} | {' | '.join(cols)} | {steps} |")
    if flax_by_batch:
        print(f"\nHF Flax (jit): transformers {ref['transformers']}, flax {ref['flax']}, jax {ref['jax']}; "
              f"its calls of {a.new} and of 1 new tokens: "
              + "; ".join(f"batch {r['batch']} {r['call_s']:.2f} s / {r['call1_s']:.3f} s" for r in ref["results"]))
    if ed_by_batch:
        print(f"\nEasyDeL (jit): easydel {ed_ref['easydel']}, flax {ed_ref['flax']}, jax {ed_ref['jax']}, attention "
              f"{ed_ref['attention']}; its calls of {a.new} and of 1 new tokens: "
              + "; ".join(f"batch {r['batch']} {r['call_s']:.2f} s / {r['call1_s']:.3f} s" for r in ed_ref["results"]))

    print("\n| generated tokens | cache bytes (window) | cache bytes (no window) |")
    print("|---|---|---|")
    no_window = cfg.replace(sliding_window=None, max_seq_len=1 << 20)
    for n in (a.window, 4 * a.window, 32 * a.window):
        total = a.prompt_len + n
        with_w = kv_cache.cache_bytes(jax.eval_shape(
            lambda: kv_cache.init_cache(cfg, 1, kv_cache.cache_size(cfg, total))))
        without = kv_cache.cache_bytes(jax.eval_shape(
            lambda: kv_cache.init_cache(no_window, 1, kv_cache.cache_size(no_window, total))))
        print(f"| {n} | {with_w:,} | {without:,} |")
    measured = decode.generate(params, cfg, [[1, 2, 3]], 4 * a.window, eos_id=-1, return_info=True).cache_bytes
    print(f"\nmeasured cache pytree after generating {4 * a.window} tokens: {measured:,} bytes")
    if not a.skip_compile_count:
        compile_count_table(params, cfg, a.new, max_len=4 * a.prompt_len)


if __name__ == "__main__":
    main()

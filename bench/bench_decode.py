"""Decode throughput of mistral_jax.decode.generate vs Hugging Face `generate` on this CPU, and cache bytes.

Both run greedy decoding of the same random-weight model (float32) from the same prompts; the
first (compiling) call of each JAX shape is a warm-up and is not timed. Prints markdown tables.

    python bench/bench_decode.py [--dim 512 --layers 8 --new 128 --batches 1 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mistral_jax import cache as kv_cache  # noqa: E402
from mistral_jax import decode, weights  # noqa: E402
from mistral_jax.config import ModelConfig  # noqa: E402


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
    a = ap.parse_args()

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
    print("| batch | mistral-jax tokens/s | HF generate tokens/s | tokens agree |")
    print("|---|---|---|---|")
    for b in a.batches:
        prompts = rs.randint(3, a.vocab, (b, a.prompt_len)).tolist()
        decode.generate(params, cfg, prompts, a.new, eos_id=-1)            # compile
        t0 = time.perf_counter()
        ours = decode.generate(params, cfg, prompts, a.new, eos_id=-1)
        t_ours = time.perf_counter() - t0
        hf_tps, agree = float("nan"), "-"
        if not a.skip_hf:
            with torch.no_grad():
                hf.generate(torch.tensor(prompts), max_new_tokens=4, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
                t0 = time.perf_counter()
                out = hf.generate(torch.tensor(prompts), max_new_tokens=a.new, min_new_tokens=a.new,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
                t_hf = time.perf_counter() - t0
            hf_tps = b * a.new / t_hf
            agree = f"{np.mean(np.array(ours) == out[:, a.prompt_len:].numpy()):.3f}"
        print(f"| {b} | {b * a.new / t_ours:.1f} | {hf_tps:.1f} | {agree} |")

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


if __name__ == "__main__":
    main()

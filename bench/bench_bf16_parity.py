"""bf16 parity at Mistral-7B layer shapes: ours vs HF PyTorch, beside the noise floor of bf16 itself.

    python bench/bench_bf16_parity.py --layers N [--workdir DIR] [--threads T]

A random Mistral-7B-shaped model with N layers (HF's own init, std 0.02, norms 1, drawn in bf16, so every
program reads the same bf16 weights) is saved in the HF layout under DIR (default /tmp/bf16_parity_L{N}; reused
when present). One random 64-token prompt; logits of every position, compared as max|a - b| / max|b| at the last
position (the issue's figure) and over all positions, with argmax agreement at the last position:

  noise floor   HF bf16 against itself with another accumulation order (1 thread instead of T; its sdpa
                attention, the HF default, instead of eager), ours bf16 against itself (dense attention
                instead of the CPU default, blockwise)
  accuracy      each bf16 program against the float32 reference (HF float32 on the same bf16 weights), and
                ours float32 against it (same function?)
  parity        ours bf16 vs HF bf16 eager (the issue's comparison) and vs HF bf16 sdpa

Two bf16 programs that round at different points or sum in different orders drift apart with depth at
about the rate each drifts from float32; a parity figure means something only beside these rows.

Not measured here: ours bf16 on XLA:CPU also varies between processes (same program and inputs; seen at
about the size of the dense-vs-blockwise row), HF bf16 did not.

Memory: HF runs first (the bf16 model, plus one layer at a time in float32 for the reference: each decoder
layer, the final norm and the head are cast up just before they run and back right after; bitwise the same
logits as the model loaded in float32), then ours (load_params in bf16; float32 compute reads the bf16
params). The bf16 model is 0.44 GB per layer + 0.52 GB; peak RSS 3.7 GB at 2 layers, 5.0 GB at 4 (about
1.5 GB + 1.6x the bf16 model, so about 8 GB at 8 layers); CPU only. Not at 32 layers on a shared machine.
"""
import argparse
import gc
import json
import os
from pathlib import Path

import numpy as np
import torch

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--workdir", type=Path, default=None)
ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the HF runs (default: all)")
args = ap.parse_args()
N, T = args.layers, args.threads
d = args.workdir or Path(f"/tmp/bf16_parity_L{N}")

from transformers import MistralConfig, MistralForCausalLM

cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=N, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=32000, sliding_window=4096, rope_theta=1e4,
                    rms_norm_eps=1e-5, max_position_embeddings=32768, tie_word_embeddings=False)
tokens = np.random.default_rng(0).integers(3, 32000, size=64)
ids = torch.as_tensor(tokens)[None]
if not (d / "config.json").exists() or json.loads((d / "config.json").read_text())["num_hidden_layers"] != N:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # HF's init drawn in bf16: no float32 copy of the model
    try:
        m = MistralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    m.save_pretrained(d)
    del m
    gc.collect()

out = {}


def hf_logits(m, threads):
    torch.set_num_threads(threads)
    with torch.no_grad():
        return m(ids).logits[0].float().numpy()


def upcast_one_at_a_time(m):
    """Hooks making `m` (bf16) compute in float32: embeddings come out float32; each decoder layer, the final
    norm and the head are cast to float32 just before they run and back to bf16 after (exact: the float32
    values are the bf16 ones). The same function as the model loaded in float32, one float32 layer at a time."""
    hooks = [m.model.embed_tokens.register_forward_hook(lambda mod, i, o: o.float())]
    for mod in [*m.model.layers, m.model.norm, m.lm_head]:
        hooks.append(mod.register_forward_pre_hook(lambda mod, i: mod.float() and None))
        hooks.append(mod.register_forward_hook(lambda mod, i, o: mod.to(torch.bfloat16) and None))
    return hooks


m = MistralForCausalLM.from_pretrained(d, dtype=torch.bfloat16, attn_implementation="eager").eval()
out["hf_bf16"] = hf_logits(m, T)
out["hf_bf16_1thread"] = hf_logits(m, 1)
m.set_attn_implementation("sdpa")
out["hf_bf16_sdpa"] = hf_logits(m, T)
m.set_attn_implementation("eager")
hooks = upcast_one_at_a_time(m)
out["hf_f32"] = hf_logits(m, T)
for h in hooks:
    h.remove()
del m
gc.collect()

import jax
import jax.numpy as jnp
from mistral_jax.model import transformer as model
from mistral_jax.model import packing
from mistral_jax.model import sharding
from mistral_jax.checkpoint.native import load_params

c, p = load_params(d, dtype=jnp.bfloat16, progress=False)
tok = jnp.asarray(tokens, jnp.int32)[None]
out["ours_bf16"] = np.asarray(model.forward(p, tok, c, dtype=jnp.bfloat16)[0], np.float32)
out["ours_f32"] = np.asarray(model.forward(p, tok, c, dtype=jnp.float32)[0], np.float32)  # bf16 params, f32 compute


@jax.jit
def dense_forward(params, tokens_BT):
    with sharding.with_rules():
        return model.Transformer(c, dtype=jnp.bfloat16, attn_impl="dense").apply({"params": params}, tokens_BT)[0]


out["ours_bf16_dense"] = np.asarray(dense_forward(packing.pack(p), tok)[0], np.float32)
del p
gc.collect()

ROWS = [
    ("noise", "HF bf16: 1 thread vs {T}", "hf_bf16_1thread", "hf_bf16"),
    ("noise", "HF bf16: sdpa vs eager", "hf_bf16_sdpa", "hf_bf16"),
    ("noise", "ours bf16: dense vs blockwise attention", "ours_bf16_dense", "ours_bf16"),
    ("accuracy", "HF bf16 (eager) vs HF f32", "hf_bf16", "hf_f32"),
    ("accuracy", "HF bf16 (sdpa) vs HF f32", "hf_bf16_sdpa", "hf_f32"),
    ("accuracy", "ours bf16 vs HF f32", "ours_bf16", "hf_f32"),
    ("accuracy", "ours f32 vs HF f32", "ours_f32", "hf_f32"),
    ("parity", "ours bf16 vs HF bf16 (eager)", "ours_bf16", "hf_bf16"),
    ("parity", "ours bf16 vs HF bf16 (sdpa)", "ours_bf16", "hf_bf16_sdpa"),
]


def ratio(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


res = {"layers": N, "threads": T, "max|hf_f32| last": float(np.abs(out["hf_f32"][-1]).max()), "rows": []}
print(f"{N} layers at Mistral-7B shapes, one 64-token prompt; max|a - b| / max|b| "
      f"(max |logit| at the last position {res['max|hf_f32| last']:.2f})")
print("| kind | comparison | last position | all positions | argmax equal |\n| --- | --- | ---: | ---: | --- |")
for kind, label, a, b in ROWS:
    label = label.format(T=T)
    last, every = ratio(out[a][-1], out[b][-1]), ratio(out[a], out[b])
    same = bool(out[a][-1].argmax() == out[b][-1].argmax())
    res["rows"].append({"kind": kind, "comparison": label, "last": last, "all": every, "argmax_equal": same})
    fmt = (lambda x: f"{x:.1e}") if last < 1e-4 else (lambda x: f"{100 * x:.2f}%")
    print(f"| {kind} | {label} | {fmt(last)} | {fmt(every)} | {same} |")
print(json.dumps(res))

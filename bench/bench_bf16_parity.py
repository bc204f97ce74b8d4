"""bf16 accuracy at Mistral-7B layer shapes, ours and HF PyTorch side by side, against float32.

    python bench/bench_bf16_parity.py N_LAYERS WORKDIR

A random Mistral-7B-shaped model with N_LAYERS layers (HF's own init: std 0.02, norms 1; stored in bf16, so both
sides and both dtypes read the same weights) is saved in the HF layout; the last-position logits of one random
64-token prompt are computed by HF `MistralForCausalLM` (eager attention) in float32 and bf16, then by ours
(`load_params` + `model.forward`) in float32 and bf16, each in turn. Prints max|a - b| / max|b| for: ours f32 vs
HF f32 (same function?), ours bf16 vs HF f32 and HF bf16 vs HF f32 (each side's bf16 error), ours bf16 vs HF bf16.
Needs about 2.5x the f32 model in RAM (4 layers: about 11 GB); CPU only.
"""
import sys, gc, json, numpy as np, torch
from pathlib import Path
N = int(sys.argv[1]); d = Path(sys.argv[2])
from transformers import MistralConfig, MistralForCausalLM
torch.manual_seed(0); torch.set_num_threads(2)
cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=N, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=32000, sliding_window=4096, rope_theta=1e4,
                    rms_norm_eps=1e-5, max_position_embeddings=32768, tie_word_embeddings=False)
rng = np.random.default_rng(0)
tokens = rng.integers(3, 32000, size=64)
if not (d / "config.json").exists():
    m = MistralForCausalLM(cfg).to(torch.bfloat16)   # HF init (std 0.02, norms 1), stored bf16: both sides see the same bf16 weights
    m.save_pretrained(d); del m; gc.collect()
out = {}
for dt in (torch.float32, torch.bfloat16):
    m = MistralForCausalLM.from_pretrained(d, dtype=dt, attn_implementation="eager").eval()
    with torch.no_grad():
        out[f"hf_{dt}"] = m(torch.as_tensor(tokens)[None]).logits[0, -1].float().numpy()
    del m; gc.collect()
import jax.numpy as jnp
from mistral_jax import model
from mistral_jax.checkpoint import load_params
for dt in (jnp.float32, jnp.bfloat16):
    c, p = load_params(d, dtype=dt, progress=False)
    out[f"ours_{jnp.dtype(dt).name}"] = np.asarray(model.forward(p, jnp.asarray(tokens, jnp.int32)[None], c, dtype=dt)[0, -1], np.float32)
    del p; gc.collect()
truth = out["hf_torch.float32"]; mx = np.abs(truth).max()
r = lambda a, b: float(np.abs(out[a] - out[b]).max() / np.abs(out[b]).max())
print(json.dumps({"layers": N, "max|truth|": float(mx),
                  "ours_f32 vs hf_f32": r("ours_float32", "hf_torch.float32"),
                  "ours_bf16 vs hf_f32": r("ours_bfloat16", "hf_torch.float32"),
                  "hf_bf16 vs hf_f32": r("hf_torch.bfloat16", "hf_torch.float32"),
                  "ours_bf16 vs hf_bf16": r("ours_bfloat16", "hf_torch.bfloat16")}))

"""How close our decode step is to what XLA:CPU allows: the step against the same products alone, JAX and PyTorch.

    python bench/bench_decode_floor.py [--batch 1 8] [--steps 60] [--rounds 3]

Model: the 57M benchmark shape (dim 512, 8 layers, 8q/2kv heads of 64, hidden 1536, vocab 32000, window 256),
float32, random weights; one decode step = `batch` tokens against a 256-slot cache holding 128 positions.
Rows, timed in one process, one after the other in `--rounds` rounds (each row's figure: the median over rounds
of the median of `--steps` calls):

- ours, whole step: `decode.compile_step`'s program (the one generate's loop runs: fused matvec, the head
  read as (V, D) at >= 4 rows), cache donated and carried.
- HF PyTorch, whole step: MistralForCausalLM (eager) forward of one token per row against a DynamicCache of
  128 positions, greedy pick; the cache is cropped back after each step.
- JAX hand-written whole step: per-layer (out, in) weights and per-layer caches as separate arrays, the layer
  loop unrolled, XLA's dot, plain masked softmax; its first step's logits must match ours (else it exits).
- Products only: the matrix products one step does and nothing else (per layer x wq, x wk, x wv, a
  (B, N*H) x wo, x w1, x w3, (B, F) x w2; then x head), on the same weights:
  - JAX, as our step computes them: layer weights stacked and scanned, `matvec.matvec`; the head as ours;
  - JAX, the fastest XLA form measured: each layer's weights separate (out, in) arrays, the loop unrolled,
    XLA's dot (no scan: a dot on a scanned weight slice copies the slice first);
  - PyTorch: `torch.nn.functional.linear` on (out, in) weights (HF's layout), inference mode.

Also printed: the bytes the products read per step, and how long reading them takes at the read bandwidth
measured in the same run (bench_decode.read_bandwidth). What it shows: the share of our step that is
products, how fast XLA's products are against PyTorch's on the same shapes, and so how far a step can go.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mistral_jax.inference import decode  # noqa: E402
from mistral_jax.model import matvec  # noqa: E402
from mistral_jax.model import packing  # noqa: E402
from mistral_jax.model import transformer as model_lib  # noqa: E402
from mistral_jax.model.rope import apply_rope  # noqa: E402

# the decode shape of profile_breakdown.py (bench/, the script's own folder, is on sys.path)
from profile_breakdown import CACHE_LEN, FILLED, WINDOW, _cfg, filled_cache  # noqa: E402

CFG = _cfg(WINDOW)
NAMES = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")


def median_ms(fn, steps: int) -> float:
    """Median wall time of `steps` calls of fn, in ms (fn blocks until its result exists)."""
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def layer_weights(params) -> dict[str, np.ndarray]:
    """The stacked layer weights as 2-D (L, in, out) float32 numpy arrays, keyed by NAMES, plus "head" (D, V)."""
    lay = params["layers"]
    a, f = lay["attention"], lay["feed_forward"]
    L, D = CFG.n_layers, CFG.dim
    w = {"wq": a["wq"].reshape(L, D, -1), "wk": a["wk"].reshape(L, D, -1), "wv": a["wv"].reshape(L, D, -1),
         "wo": a["wo"].reshape(L, -1, D), "w1": f["w1"], "w3": f["w3"], "w2": f["w2"]}
    out = {k: np.asarray(v, np.float32) for k, v in w.items()}
    out["head"] = np.asarray(params["output"], np.float32)
    return out


def chain(x, ws, prod):
    """One layer's products: the step's q/k/v/o/w1/w3/w2 products chained so none is dead code."""
    q = prod(x, ws["wq"])
    k, v = prod(x, ws["wk"]), prod(x, ws["wv"])
    o = prod(q + 1e-3 * jnp.tile(k + v, (1, q.shape[1] // k.shape[1])), ws["wo"])
    g, u = prod(x, ws["w1"]), prod(x, ws["w3"])
    return x + o + prod(jax.nn.silu(g) * u, ws["w2"])


def jax_scanned(w, batch: int):
    """() -> logits of the products as our step computes them (stacked, scanned, matvec; the head as ours)."""
    stacked = {k: jnp.asarray(w[k]) for k in NAMES}
    transposed = decode.uses_transposed_head({"output": w["head"]}, batch, True)
    head = jnp.asarray(np.ascontiguousarray(w["head"].T) if transposed else w["head"])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, CFG.dim), np.float32))

    def f(x, stacked, head):
        x, _ = jax.lax.scan(lambda h, ws: (chain(h, ws, matvec.matvec), None), x, stacked)
        return jnp.einsum("bd,vd->bv" if transposed else "bd,dv->bv", x, head)

    c = jax.jit(f).lower(x, stacked, head).compile(compiler_options=matvec.compiler_options(True))
    return lambda: c(x, stacked, head).block_until_ready()


def jax_unrolled(w, batch: int):
    """() -> logits of the same products with per-layer (out, in) weights, unrolled, XLA's dot."""
    layers = [{k: jnp.asarray(np.ascontiguousarray(w[k][i].T)) for k in NAMES} for i in range(CFG.n_layers)]
    head = jnp.asarray(np.ascontiguousarray(w["head"].T))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, CFG.dim), np.float32))
    dot = lambda a, b: jnp.einsum("bi,oi->bo", a, b)  # noqa: E731

    def f(x, layers, head):
        for ws in layers:
            x = chain(x, ws, dot)
        return dot(x, head)

    c = jax.jit(f).lower(x, layers, head).compile()
    return lambda: c(x, layers, head).block_until_ready()


def torch_products(w, batch: int):
    """() -> logits of the same products in PyTorch, F.linear on (out, in) weights."""
    import torch
    F = torch.nn.functional
    layers = [{k: torch.from_numpy(np.ascontiguousarray(w[k][i].T)) for k in NAMES} for i in range(CFG.n_layers)]
    head = torch.from_numpy(np.ascontiguousarray(w["head"].T))
    x0 = torch.from_numpy(np.random.default_rng(1).standard_normal((batch, CFG.dim), np.float32))
    rep = CFG.n_heads // CFG.n_kv_heads

    def run():
        with torch.inference_mode():
            x = x0
            for ws in layers:
                q = F.linear(x, ws["wq"])
                k, v = F.linear(x, ws["wk"]), F.linear(x, ws["wv"])
                o = F.linear(q + 1e-3 * (k + v).repeat(1, rep), ws["wo"])
                x = x + o + F.linear(F.silu(F.linear(x, ws["w1"])) * F.linear(x, ws["w3"]), ws["w2"])
            return F.linear(x, head)
    return run


def ours_step(params, batch: int, out: dict):
    """() -> one step of generate's decode program (cache filled to FILLED positions, donated, carried);
    out["first"] gets the first step's logits (later steps find position FILLED cached by the step before)."""
    compiled = decode.compile_step(params, CFG, batch, CACHE_LEN)
    packed = packing.pack(params)
    head_VD = (decode.transposed_head(packed["output"])
               if decode.uses_transposed_head(packed, batch, decode.uses_fused_matvec(None)) else None)
    tok_B, pos_B = jnp.full((batch,), 5, jnp.int32), jnp.full((batch,), FILLED, jnp.int32)
    box = {"cache": filled_cache(CFG, batch)}

    def run():  # every step writes slot FILLED at position FILLED: the same work each time
        logits, box["cache"] = compiled(packed, tok_B, pos_B, box["cache"], head_VD)
        out.setdefault("first", jax.block_until_ready(logits))
    return run


def hand_step(params, w, batch: int, out: dict):
    """() -> the same step written out by hand for XLA: per-layer (out, in) weights and per-layer caches as
    separate arrays, the layer loop unrolled, XLA's dot, plain masked softmax over the cache written first;
    out["first"] gets the first step's logits (checked against ours)."""
    L, N, K, H = CFG.n_layers, CFG.n_heads, CFG.n_kv_heads, CFG.head_dim
    layers = [{k: jnp.asarray(np.ascontiguousarray(w[k][i].T)) for k in NAMES} for i in range(L)]
    norms = [(params["layers"]["attention_norm"]["scale"][i], params["layers"]["ffn_norm"]["scale"][i])
             for i in range(L)]
    head = jnp.asarray(np.ascontiguousarray(w["head"].T))
    stacked = filled_cache(CFG, batch)
    caches = [{k: v[i] for k, v in stacked.items()} for i in range(L)]
    dot = lambda a, b: jnp.einsum("bi,oi->bo", a, b)  # noqa: E731
    rms = lambda x, s: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + CFG.norm_eps) * s  # noqa: E731

    def step(layers, norms, head, emb, final_norm, tok_B, pos_B, caches):
        h, B, new = emb[tok_B], tok_B.shape[0], []
        b, slot = jnp.arange(B), pos_B % CACHE_LEN
        for ws, (an, fn), c in zip(layers, norms, caches):
            x = rms(h, an)
            q = apply_rope(dot(x, ws["wq"]).reshape(B, 1, N, H), pos_B[:, None], CFG.rope_theta)[:, 0]
            k = apply_rope(dot(x, ws["wk"]).reshape(B, 1, K, H), pos_B[:, None], CFG.rope_theta)[:, 0]
            c = {"k": c["k"].at[b, slot].set(k), "v": c["v"].at[b, slot].set(dot(x, ws["wv"]).reshape(B, K, H)),
                 "pos": c["pos"].at[b, slot].set(pos_B)}
            s = jnp.einsum("bkgh,bckh->bkgc", q.reshape(B, K, N // K, H), c["k"]) * H ** -0.5
            seen = (c["pos"] >= 0) & (c["pos"] <= pos_B[:, None]) & (c["pos"] > pos_B[:, None] - WINDOW)
            p = jax.nn.softmax(jnp.where(seen[:, None, None], s, jnp.finfo(jnp.float32).min), -1)
            h = h + dot(jnp.einsum("bkgc,bckh->bkgh", p, c["v"]).reshape(B, N * H), ws["wo"])
            x = rms(h, fn)
            h = h + dot(jax.nn.silu(dot(x, ws["w1"])) * dot(x, ws["w3"]), ws["w2"])
            new.append(c)
        return dot(rms(h, final_norm), head), new

    args = [layers, norms, head, jnp.asarray(params["tok_embeddings"]), jnp.asarray(params["norm"]["scale"]),
            jnp.full((batch,), 5, jnp.int32), jnp.full((batch,), FILLED, jnp.int32)]
    compiled = jax.jit(step, donate_argnums=7).lower(*args, caches).compile()
    box = {"caches": caches}

    def run():
        logits, box["caches"] = compiled(*args, box["caches"])
        out.setdefault("first", jax.block_until_ready(logits))
    return run


def hf_step(params, batch: int):
    """() -> one HF PyTorch decode step (eager MistralForCausalLM, DynamicCache of FILLED positions)."""
    import tempfile

    import torch
    from transformers import DynamicCache, MistralForCausalLM

    from mistral_jax.checkpoint.torch_write import write_hf
    with tempfile.TemporaryDirectory() as tmp:
        write_hf(Path(tmp), CFG, params, progress=False)
        hf = MistralForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
    prompt = torch.from_numpy(np.random.default_rng(0).integers(3, CFG.vocab_size, (batch, FILLED))).long()
    with torch.inference_mode():
        out = hf(input_ids=prompt, cache=DynamicCache(config=hf.config), use_cache=True)
    cache = out.past_key_values
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    pos = torch.full((batch, 1), FILLED, dtype=torch.long)

    def run():
        with torch.inference_mode():
            hf(input_ids=tok, cache=cache, position_ids=pos, use_cache=True).logits[:, -1].argmax(-1)
        cache.crop(-1)   # drop the token just written: every step sees FILLED cached positions
    return run


ROWS = (("ours, whole step (decode.compile_step)", "ours"),
        ("HF PyTorch eager, whole step", "hf"),
        ("JAX hand-written whole step (per-layer arrays, unrolled, dot)", "hand"),
        ("products only, JAX as our step (stacked, scanned, matvec)", "jax_scanned"),
        ("products only, JAX fastest form (per-layer (out, in), unrolled, dot)", "jax_unrolled"),
        ("products only, PyTorch F.linear (out, in)", "torch"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    params = jax.device_get(model_lib.init_params(CFG, jax.random.key(0)))
    w = layer_weights(params)
    from bench_decode import read_bandwidth   # bench/, the script's own folder, is on sys.path
    bw, how = read_bandwidth()
    nbytes = sum(v.nbytes for v in w.values())
    print(f"# decode floor, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}, torch {torch.__version__}; 57M model, float32, "
          f"cache {CACHE_LEN} slots / {FILLED} filled; ms per step, median over {args.rounds} rounds of "
          f"{args.steps} calls")
    print(f"Bytes the products read per step: {nbytes / 1e6:.1f} MB; at the measured read bandwidth "
          f"({how}) {nbytes / bw * 1e3:.2f} ms\n")
    print("| batch | " + " | ".join(name for name, _ in ROWS) + " | ours / HF speed | PyTorch products' speed / JAX's best |")
    print("|---" * (len(ROWS) + 3) + "|")
    for batch in args.batch:
        logits: dict[str, dict] = {"ours": {}, "hand": {}}
        makers = {"ours": lambda: ours_step(params, batch, logits["ours"]), "hf": lambda: hf_step(params, batch),
                  "hand": lambda: hand_step(params, w, batch, logits["hand"]),
                  "jax_scanned": lambda: jax_scanned(w, batch), "jax_unrolled": lambda: jax_unrolled(w, batch),
                  "torch": lambda: torch_products(w, batch)}
        runs = {key: makers[key]() for _, key in ROWS}
        for run in runs.values():
            for _ in range(5):
                run()
        got: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(args.rounds):
            for key, run in runs.items():
                got[key].append(median_ms(run, args.steps))
        ms = {key: statistics.median(v) for key, v in got.items()}
        diff = float(jnp.max(jnp.abs(logits["ours"]["first"] - logits["hand"]["first"])))
        if not diff < 1e-3:
            raise SystemExit(f"batch {batch}: the hand-written step's logits differ from ours by {diff}")
        best_jax = min(ms["jax_scanned"], ms["jax_unrolled"])
        print(f"| {batch} | " + " | ".join(f"{ms[key]:.2f}" for _, key in ROWS)
              + f" | {ms['hf'] / ms['ours']:.2f}x | {best_jax / ms['torch']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

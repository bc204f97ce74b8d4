"""What only a device can show, in one command on one GPU or TPU chip, in at most about 8 minutes.

    python bench/device_check.py [--out device_check.json] [--time-budget 420] [--only a,b,c,d,e]
    python bench/device_check.py --smoke        # every section at tiny sizes (CPU: well under 3 minutes)

Writes the JSON (--out) and a markdown report beside it (same name, .md), and prints the markdown.

(a) attention: every backend of this platform (TPU: splash, blockwise; GPU: xla, blockwise, cudnn (bf16 only);
    CPU: blockwise, xla, splash in interpret mode) against the dense oracle (`attend` under
    `attention_mask`, float32 at "highest" matmul precision, run in query chunks so 16K tokens fit), on
    the output and on the gradients of q, k and v, in float32 and bfloat16 (inputs bf16-representable, so
    one oracle serves both). Rows: offset positions with left and right padding, and packed segments with
    trailing padding; window None and 4096; T up to 16K. Error = max |backend - oracle| / max |oracle|
    over queries that see a key; every output and gradient must also be finite, padding queries included.
(b) train: the jitted train step (`train_step.make_train_step`) of a ~1B-parameter Mistral-shaped model
    (dim 2048, 16 layers, 16 q / 4 kv heads of 128, hidden 7168, vocab 32000, window 4096), bf16 compute,
    float32 master weights, AdamW; tokens/s and MFU (`flops.train_flops_per_token`) against the chip's
    datasheet peak and against a measured bf16 matmul. Remat "none" unless the compiled step would not fit.
(c) decode: `decode.generate` (greedy, bf16 weights of the same model) at batch 1, 8 and 64; a decode step's
    time is (call of 1 + n tokens - call of 1 token) / n (one jit program serves both); tokens/s against
    the HBM roofline: bytes per step = the weights a step reads (all but the embedding table, plus one
    embedding row per sequence) + the filled KV cache (average over the timed steps).
(d) scoring: `scoring.Scorer` over packed random requests; input tokens/s (second call, compiled).
(e) LoRA memory: `memory_plan.plan` of the Mistral-7B LoRA train step (rank 16, bf16, remat full) compiled
    for this device (nothing allocated): XLA's argument / temp / code bytes against the device memory.

Each section runs in try/except (its error is recorded in one line, the others still run) within its share
of --time-budget; runs that would start past it are recorded as skipped. A watchdog writes what is done and
exits if the whole run overruns the budget by a margin. Exit status: 0 when every section is "ok", 1 when
one is not, 2 when refused (full mode on a CPU without --force), 3 on the watchdog.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SECTIONS = {"a": "attention", "b": "train", "c": "decode", "d": "scoring", "e": "lora_memory"}
# Shares of the time budget, from the first full run on an H200 (2026-12-04: walls a 146 s, b 18, c 29, d 4, e 29
# with budget 420; at a share of 0.30 (a) ran out of its 125 s one run short). A section that ends early leaves its
# time to the ones after it.
WEIGHTS = {"a": 0.50, "b": 0.15, "c": 0.15, "d": 0.05, "e": 0.15}


# ----- chips -----

@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float      # dense (no sparsity) bf16 FLOP/s per chip
    hbm_bytes_per_s: float
    hbm_bytes: float
    source: str


_NV = "NVIDIA datasheet (dense bf16 = half the 'with sparsity' figure)"
_TPU = "Google Cloud TPU system-architecture docs (per chip)"
# Matched in order against device_kind (lower case): every pattern of an entry must occur in it. Entries
# that are None are known-unknown (e.g. GH200 comes in HBM3 and HBM3e variants): MFU / roofline not computed.
CHIPS: tuple[tuple[tuple[str, ...], Chip | None], ...] = (
    (("gh200",), None),
    (("h200", "nvl"), Chip("NVIDIA H200 NVL", 835e12, 4.8e12, 141e9, _NV)),
    (("h200",), Chip("NVIDIA H200 SXM", 989e12, 4.8e12, 141e9, _NV)),
    (("h100", "nvl"), Chip("NVIDIA H100 NVL", 835e12, 3.9e12, 94e9, _NV)),
    (("h100", "pcie"), Chip("NVIDIA H100 PCIe", 756e12, 2.0e12, 80e9, _NV)),
    (("h100",), Chip("NVIDIA H100 SXM", 989e12, 3.35e12, 80e9, _NV)),
    (("a100", "40gb"), Chip("NVIDIA A100 40GB", 312e12, 1.555e12, 40e9, _NV)),
    (("a100", "pcie"), Chip("NVIDIA A100 80GB PCIe", 312e12, 1.935e12, 80e9, _NV)),
    (("a100",), Chip("NVIDIA A100 80GB SXM", 312e12, 2.039e12, 80e9, _NV)),
    (("l40s",), Chip("NVIDIA L40S", 362e12, 864e9, 48e9, _NV)),
    (("l4",), Chip("NVIDIA L4", 121e12, 300e9, 24e9, _NV)),
    (("tpu v4",), Chip("TPU v4", 275e12, 1.2e12, 32 * 2 ** 30, _TPU)),
    (("tpu v5 lite",), Chip("TPU v5e", 197e12, 819e9, 16 * 2 ** 30, _TPU)),
    (("tpu v5e",), Chip("TPU v5e", 197e12, 819e9, 16 * 2 ** 30, _TPU)),
    (("tpu v5",), Chip("TPU v5p", 459e12, 2.765e12, 95 * 2 ** 30, _TPU)),   # "TPU v5" and "TPU v5p"
    (("tpu v6 lite",), Chip("TPU v6e", 918e12, 1.64e12, 32 * 2 ** 30, _TPU)),
    (("tpu v6e",), Chip("TPU v6e", 918e12, 1.64e12, 32 * 2 ** 30, _TPU)),
)


def chip_for(device_kind: str) -> Chip | None:
    """The datasheet entry of a jax device_kind, or None (unknown: MFU and rooflines are not computed)."""
    kind = device_kind.lower()
    for patterns, chip in CHIPS:
        if all(p in kind for p in patterns):
            return chip
    return None


# ----- sizes -----

@dataclasses.dataclass(frozen=True)
class Sizes:
    # (a)
    attn_groups: tuple            # (T, rows, window) runs, in order
    attn_heads: tuple[int, int, int]   # (N, K, H)
    attn_batch: int
    attn_block: int
    attn_oracle_chunk: int
    attn_dtypes: tuple[str, ...]
    # (b), (c), (d): one model
    model: dict
    train_batch: int
    train_seq: int
    train_steps: int
    matmul_n: int
    # (c)
    decode_batches: tuple[int, ...]
    decode_prompt: int
    decode_new: int
    decode_bucket: int
    decode_repeats: int
    # (d)
    score_requests: int
    score_lengths: tuple[int, int]
    score_max_input: int
    score_batch: int
    # (e)
    lora_model: str | dict
    lora_rank: int
    lora_layouts: tuple[tuple[int, int], ...]   # (batch, seq_len)
    bandwidth_bytes: int


FULL = Sizes(
    # the 16K runs first: if the budget runs short, the quick 1K runs are the ones skipped
    attn_groups=tuple((T, rows, w) for T, windows in ((16384, (4096, None)), (1024, (256, None)))
                      for rows in ("offset+padding", "packed+padding") for w in windows),
    attn_heads=(4, 2, 128), attn_batch=2, attn_block=512, attn_oracle_chunk=1024,
    attn_dtypes=("float32", "bfloat16"),
    model=dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, head_dim=128, hidden_dim=7168, vocab_size=32000,
               sliding_window=4096, max_seq_len=4096),
    train_batch=8, train_seq=2048, train_steps=5, matmul_n=8192,
    decode_batches=(1, 8, 64), decode_prompt=128, decode_new=255, decode_bucket=256, decode_repeats=2,
    score_requests=96, score_lengths=(128, 512), score_max_input=1024, score_batch=16,
    lora_model="mistral-7b-v0.1", lora_rank=16, lora_layouts=((1, 4096), (4, 4096)),
    bandwidth_bytes=2 ** 32,
)
SMOKE = Sizes(
    attn_groups=((256, "offset+padding", None), (256, "packed+padding", 48)),
    attn_heads=(4, 2, 16), attn_batch=2, attn_block=128, attn_oracle_chunk=128,
    attn_dtypes=("float32", "bfloat16"),
    model=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=512,
               sliding_window=32, max_seq_len=1024),
    train_batch=2, train_seq=64, train_steps=3, matmul_n=256,
    decode_batches=(1, 8, 64), decode_prompt=8, decode_new=63, decode_bucket=64, decode_repeats=3,
    score_requests=24, score_lengths=(16, 96), score_max_input=128, score_batch=8,
    lora_model=dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=512,
                    sliding_window=32, max_seq_len=1024),
    lora_rank=4, lora_layouts=((2, 64),), bandwidth_bytes=2 ** 26,
)
TOL = {"float32": 1e-4, "bfloat16": 2e-2}   # max |err| / max |oracle|, per tensor


# ----- helpers -----

class Budget:
    """Deadlines: each section gets its weight's share of the time left when it starts."""

    def __init__(self, total_s: float, keys: list[str]):
        self.t0 = time.perf_counter()
        self.total = total_s
        self.left = list(keys)

    def section_deadline(self, key: str) -> float:
        now = time.perf_counter()
        remaining = max(self.total - (now - self.t0), 0.0)
        share = WEIGHTS[key] / sum(WEIGHTS[k] for k in self.left)
        self.left.remove(key)
        return now + remaining * share


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:400]


def finite(x: Any) -> Any:
    """JSON-safe number: non-finite floats become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, float):
        return finite(obj)
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
        return clean(obj.item())
    return obj


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    import jax
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def device_memory(dev: Any, chip: Chip | None) -> tuple[float | None, str]:
    """(bytes usable on the device, where the number comes from)."""
    try:
        stats = dev.memory_stats() or {}
        if stats.get("bytes_limit"):
            return float(stats["bytes_limit"]), "memory_stats()['bytes_limit']"
    except Exception:  # noqa: BLE001 - some backends have no memory stats
        pass
    if chip is not None:
        return chip.hbm_bytes, "datasheet"
    return None, "unknown"


def measure_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Best read bandwidth (bytes/s) of a jitted sum over an nbytes float32 array on the default device."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    return nbytes / best_time(lambda: f(x), repeats)


def model_cfg(d: dict) -> Any:
    from mistral_jax.model.config import ModelConfig
    return ModelConfig(**d)


def fit_layers(cfg: Any, bytes_per_param: float, mem: float | None, share: float) -> Any:
    """cfg with n_layers halved until n_params * bytes_per_param fits `share` of the device memory."""
    from mistral_jax.model import transformer as model_lib
    while mem is not None and cfg.n_layers > 2 and model_lib.count_params(cfg) * bytes_per_param > share * mem:
        cfg = cfg.replace(n_layers=cfg.n_layers // 2)
    return cfg


def bf16_model(sz: Sizes, ctx: dict) -> tuple[Any, Any]:
    """(cfg, random bfloat16 params) of the section model, made once for (c) and (d)."""
    if "bf16_model" not in ctx:
        import jax
        import jax.numpy as jnp

        from mistral_jax.model import transformer as model_lib
        cfg = fit_layers(model_cfg(sz.model), 2, ctx["device_memory"], 0.5)
        ctx["bf16_model"] = (cfg, model_lib.init_params(cfg, jax.random.key(1), param_dtype=jnp.bfloat16))
    return ctx["bf16_model"]


# ----- (a) attention -----

def attention_rows(T: int, B: int) -> dict[str, tuple[Any, Any]]:
    """name -> (positions (B, T), segment ids (B, T) or None), as numpy int32."""
    import numpy as np
    off = np.zeros((B, T), np.int32)
    for b in range(B):
        if b % 2 == 0:      # offset positions (a chunk deep into a document)
            off[b] = 3000 + 7 * b + np.arange(T)
        else:               # left padding, positions from 0, right padding
            left, right = T // 8, T // 16
            off[b] = -1
            off[b, left:T - right] = np.arange(T - left - right)
    pos = np.full((B, T), -1, np.int32)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = [0, int(T * 0.3), int(T * 0.75), T] if b % 2 == 0 else [0, int(T * 0.55), T - T // 8]
        for s, (a, e) in enumerate(zip(cuts[:-1], cuts[1:]), 1):
            pos[b, a:e], seg[b, a:e] = np.arange(e - a), s
    return {"offset+padding": (off, None), "packed+padding": (pos, seg)}


def _backends(platform_name: str) -> list[tuple[str, bool]]:
    """(backend, is a library implementation) for this platform; a probe's result is reported, not required."""
    if platform_name == "tpu":
        return [("splash", True), ("blockwise", True)]
    if platform_name == "gpu":
        return [("xla", True), ("blockwise", True), ("cudnn", True)]
    return [("blockwise", True), ("xla", True), ("splash", True)]


def section_attention(sz: Sizes, deadline: float, ctx: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mistral_jax.model.attention import multihead_attention

    N, K, H = sz.attn_heads
    B = sz.attn_batch

    def run(impl, q, k, v, ct, pos, seg, window, block):
        f = lambda q, k, v: multihead_attention(q, k, v, pos, pos, window, seg, seg, impl=impl,  # noqa: E731
                                                block=block, self_attention=True)
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(ct.astype(out.dtype)))

    fwd_bwd = jax.jit(run, static_argnames=("impl", "window", "block"))

    def oracle_chunk(q, k, v, ct, pos, seg, start, window, chunk):
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, 1)  # noqa: E731
        qpos, qseg = sl(pos), None if seg is None else sl(seg)
        f = lambda qc, k, v: multihead_attention(qc, k, v, qpos, pos, window, qseg, seg, impl="dense")  # noqa: E731
        out, vjp = jax.vjp(f, sl(q), k, v)
        return (out, *vjp(sl(ct)))

    oracle_jit = jax.jit(oracle_chunk, static_argnames=("window", "chunk"))

    def oracle(q, k, v, ct, pos, seg, window):
        T = q.shape[1]
        chunk = min(sz.attn_oracle_chunk, T)
        assert T % chunk == 0, (T, chunk)
        outs, dqs, dk, dv = [], [], 0.0, 0.0
        for s in range(0, T, chunk):
            o, dq, dk_c, dv_c = oracle_jit(q, k, v, ct, pos, seg, jnp.int32(s), window=window, chunk=chunk)
            outs.append(o)
            dqs.append(dq)
            dk, dv = dk + dk_c, dv + dv_c
        return jnp.concatenate(outs, 1), jnp.concatenate(dqs, 1), dk, dv

    @jax.jit
    def rel_errors(got, ref, seen):
        out = []
        for i, (g, r) in enumerate(zip(got, ref)):
            g = g.astype(jnp.float32)
            if i == 0:   # the output: queries that see no key (padding) are junk in some backends
                g, r = jnp.where(seen, g, 0.0), jnp.where(seen, r, 0.0)
            out.append(jnp.max(jnp.abs(g - r)) / jnp.maximum(jnp.max(jnp.abs(r)), 1e-30))
        # junk, but finite: a NaN at a padding query would reach the weight gradients through 0 * NaN
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in got]))
        return jnp.stack(out), finite

    rows, skipped = [], []
    backends = _backends(ctx["platform"])
    highest = functools.partial(jax.default_matmul_precision, "highest")
    for T, case, window in sz.attn_groups:
        group = dict(T=T, case=case, window=window)
        if time.perf_counter() > deadline:
            skipped.append(group)
            continue
        pos_np, seg_np = attention_rows(T, B)[case]
        key = jax.random.key(T + 17 * len(rows))
        kq, kk, kv, kc = jax.random.split(key, 4)
        bf = lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)  # noqa: E731
        q = bf(jax.random.normal(kq, (B, T, N, H), jnp.float32))
        k = bf(jax.random.normal(kk, (B, T, K, H), jnp.float32))
        v = bf(jax.random.normal(kv, (B, T, K, H), jnp.float32))
        pos = jnp.asarray(pos_np)
        seg = None if seg_np is None else jnp.asarray(seg_np)
        seen = (pos >= 0)[:, :, None, None]       # a real query always sees itself
        ct = jnp.where(seen, bf(jax.random.normal(kc, (B, T, N, H), jnp.float32)), 0.0)
        t0 = time.perf_counter()
        try:
            with highest():
                ref = jax.block_until_ready(oracle(q, k, v, ct, pos, seg, window))
        except Exception as e:  # noqa: BLE001
            rows.append({**group, "backend": "dense-oracle", "dtype": "float32", "error": one_line(e),
                         "pass": False, "required": True})
            continue
        oracle_s = time.perf_counter() - t0
        for dtype in sz.attn_dtypes:
            # float32 runs check the algorithm (no TF32 / bf16-pass matmuls); bfloat16 runs as in production
            precision = highest if dtype == "float32" else contextlib.nullcontext
            dt = jnp.dtype(dtype)
            args = [x.astype(dt) for x in (q, k, v, ct)]
            for impl, required in backends:
                if impl == "cudnn" and dtype == "float32":
                    continue        # cuDNN's fused attention takes fp16 / bf16 only
                row = {**group, "backend": impl, "dtype": dtype, "required": required,
                       "tol": TOL[dtype], "oracle_s": round(oracle_s, 3)}
                if time.perf_counter() > deadline:
                    skipped.append({**group, "backend": impl, "dtype": dtype})
                    continue
                try:
                    call = functools.partial(fwd_bwd, impl, *args, pos, seg, window=window, block=sz.attn_block)
                    with precision():
                        t0 = time.perf_counter()
                        got = jax.block_until_ready(call())
                        row["first_call_s"] = round(time.perf_counter() - t0, 3)
                        rel, finite = rel_errors(got, ref, seen)
                        errs = [float(x) for x in np.asarray(rel)]
                        del got
                        row["fwd_bwd_ms"] = round(1e3 * best_time(call, 1), 3)
                    row.update(err_out=errs[0], err_dq=errs[1], err_dk=errs[2], err_dv=errs[3],
                               all_finite=bool(finite))
                    row["pass"] = row["all_finite"] and all(math.isfinite(e) and e <= TOL[dtype] for e in errs)
                except Exception as e:  # noqa: BLE001
                    row.update(error=one_line(e), **{"pass": False})
                rows.append(row)
        del ref, q, k, v, ct
        gc.collect()
    req = [r for r in rows if r["required"]]
    failed = [r for r in req if not r["pass"]]
    worst = {}
    for dtype in sz.attn_dtypes:
        errs = [max(r[f"err_{t}"] for t in ("out", "dq", "dk", "dv")) for r in req
                if r["dtype"] == dtype and "err_out" in r]
        worst[dtype] = max(errs) if errs else None
    return {
        "status": "ok" if not failed and not skipped else "fail",
        "sizes": {"groups": [list(g) for g in sz.attn_groups], "batch": B, "n_heads": N, "n_kv_heads": K,
                  "head_dim": H, "block": sz.attn_block,
                  "oracle_chunk": sz.attn_oracle_chunk, "dtypes": list(sz.attn_dtypes),
                  "backends": [b for b, _ in backends], "probes": [b for b, r in backends if not r]},
        "metric": "max |backend - oracle| / max |oracle| per tensor (out over queries that see a key; dq, dk, dv)",
        "runs": len(rows), "passed": sum(r["pass"] for r in rows), "failed_required": len(failed),
        "worst_rel_err": worst, "skipped": skipped, "rows": rows,
        **({"error": f"{len(failed)} required run(s) failed, first: {_row_name(failed[0])}"} if failed else
           {"error": f"{len(skipped)} run(s) skipped (time budget)"} if skipped else {}),
    }


def _row_name(r: dict) -> str:
    tail = r.get("error") or ", ".join(f"{t} {r.get('err_' + t, float('nan')):.2e}" for t in ("out", "dq", "dk", "dv"))
    return f"{r['backend']} {r['dtype']} T={r['T']} {r['case']} window={r['window']}: {tail}"


# ----- (b) train -----

def section_train(sz: Sizes, deadline: float, ctx: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mistral_jax.model import flops
    from mistral_jax.training import optim
    from mistral_jax.model import sharding
    from mistral_jax.model import transformer as model_lib
    from mistral_jax.training import train_step as ts
    from mistral_jax.model.attention import resolve_impl
    from mistral_jax.training.run_config import OptimSection

    mem = ctx["device_memory"]
    # float32 master weights + Adam's two moments + gradients: 16 bytes a parameter
    cfg = fit_layers(model_cfg(sz.model), 16, mem, 0.5)
    n_params = model_lib.count_params(cfg)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    o = OptimSection(lr=1e-4, warmup_steps=0)
    opt = optim.make_optimizer(o, 1000)
    state = ts.init_state(cfg, opt, jax.random.key(0), mesh, jnp.float32)
    B, T = sz.train_batch, sz.train_seq
    rng = np.random.default_rng(0)
    host = {"tokens": rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32),
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
            "segment_ids": np.ones((B, T), np.int32)}
    batch = ts.put_batch(host, mesh, 1)
    out: dict[str, Any] = {"model": {**cfg.to_dict(), "n_params": n_params,
                                     "scaled_down": cfg.n_layers != sz.model["n_layers"]},
                           "batch": B, "seq_len": T, "dtype": "bfloat16", "param_dtype": "float32",
                           "attn_impl": resolve_impl("auto", True, True, dtype=jnp.bfloat16, head_dim=cfg.head_dim)}
    compiled, compile_s = None, []
    for remat in ("none", "full"):
        step = ts.make_train_step(cfg, opt, optim.learning_rate_schedule(o, 1000), mesh, dtype=jnp.bfloat16,
                                  param_dtype=jnp.float32, remat=remat)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s.append(time.perf_counter() - t0)
        need = _compiled_bytes(compiled)
        out["remat"], out["compiled_bytes"] = remat, need
        if mem is None or need is None or need <= 0.9 * mem or time.perf_counter() > deadline:
            break
    out["compile_s"] = [round(s, 2) for s in compile_s]
    state, m = compiled(state, batch)
    losses = [float(m["loss"])]
    times = []
    for _ in range(sz.train_steps):
        if times and time.perf_counter() + times[-1] > deadline:
            break
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        losses.append(float(m["loss"]))    # waits for the step
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tps = B * T / step_s
    fpt = flops.train_flops_per_token(cfg, T)
    chip = ctx["chip"]
    matmul = flops.measure_peak_flops(sz.matmul_n, jnp.bfloat16, repeats=5)
    out.update(steps_timed=len(times), step_s=[round(t, 4) for t in times], median_step_s=step_s,
               tokens_per_s=tps, train_flops_per_token=fpt, model_tflops_per_s=tps * fpt / 1e12,
               peak_flops=None if chip is None else chip.peak_bf16_flops,
               mfu=None if chip is None else flops.mfu(tps, fpt, chip.peak_bf16_flops),
               matmul_flops_measured=matmul, matmul_n=sz.matmul_n,
               mfu_vs_measured_matmul=flops.mfu(tps, fpt, matmul),
               losses=losses, finite=bool(m["finite"]) and all(math.isfinite(x) for x in losses))
    out["status"] = "ok" if out["finite"] else "fail"
    if not out["finite"]:
        out["error"] = f"non-finite loss or update: losses {losses}"
    return out


def _compiled_bytes(compiled: Any) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                   + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


# ----- (c) decode -----

def section_decode(sz: Sizes, deadline: float, ctx: dict) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from mistral_jax.inference import decode
    from mistral_jax.model import transformer as model_lib

    cfg, params = bf16_model(sz, ctx)
    n_params = model_lib.count_params(cfg)
    item = 2
    bw_spec = None if ctx["chip"] is None else ctx["chip"].hbm_bytes_per_s
    bw_meas = ctx.get("bandwidth_measured")
    P, n = sz.decode_prompt, sz.decode_new
    rng = np.random.default_rng(2)
    rows, skipped = [], []
    for B in sz.decode_batches:
        if time.perf_counter() > deadline:
            skipped.append(B)
            continue
        prompts = rng.integers(3, cfg.vocab_size, (B, P)).tolist()

        def gen(k, prompts=prompts):
            return decode.generate(params, cfg, prompts, k, eos_id=-1, dtype=jnp.bfloat16,
                                   bucket_smallest=sz.decode_bucket, return_info=True)
        t0 = time.perf_counter()
        g = gen(1 + n)
        first_s = time.perf_counter() - t0
        g1 = gen(1)
        t_n = best_time(lambda: gen(1 + n).tokens, sz.decode_repeats)
        t_1 = best_time(lambda: gen(1).tokens, sz.decode_repeats)
        step_s = (t_n - t_1) / n      # <= 0 when noise swamps the n steps: reported, and the section fails
        # bytes a decode step must read: weights but the embedding table, B embedding rows, filled KV cache
        filled = min(g.shapes.cache_len, P + 1 + n / 2)
        kv = 2 * cfg.n_layers * B * filled * cfg.n_kv_heads * cfg.head_dim * item
        weights = (n_params - cfg.vocab_size * cfg.dim + B * cfg.dim) * item
        step_bytes = weights + kv
        row = {"batch": B, "prompt": P, "new_tokens": n, "decode_steps": g.decode_steps,
               "same_program": g.shapes == g1.shapes, "shapes": dataclasses.asdict(g.shapes),
               "first_call_s": first_s, "call_1_s": t_1, "call_1n_s": t_n, "step_ms": 1e3 * step_s,
               "tokens_per_s": B / step_s if step_s > 0 else None, "step_bytes": step_bytes, "kv_bytes": kv,
               "cache_bytes_allocated": g.cache_bytes}
        for label, bw in (("spec", bw_spec), ("measured", bw_meas)):
            roof = None if bw is None else B * bw / step_bytes
            row[f"roofline_tokens_per_s_{label}"] = roof
            tps = row["tokens_per_s"]
            row[f"of_roofline_{label}"] = None if roof is None or not tps else tps / roof
        rows.append(row)
    bad = [r for r in rows if not (r["tokens_per_s"] and r["tokens_per_s"] > 0 and r["decode_steps"] == n)]
    out = {"model": {**cfg.to_dict(), "n_params": n_params, "scaled_down": cfg.n_layers != sz.model["n_layers"]},
           "dtype": "bfloat16", "bandwidth_spec": bw_spec, "bandwidth_measured": bw_meas,
           "method": "step = (call of 1+n tokens - call of 1 token) / n, best of repeats; greedy, no EOS",
           "roofline_bytes": "weights but the embedding table + B embedding rows + filled KV cache "
                             "(prompt + 1 + n/2 slots, capped by the cache), bf16",
           "rows": rows, "skipped_batches": skipped,
           "status": "ok" if not bad and not skipped else "fail"}
    if bad:
        b = bad[0]
        out["error"] = f"batch {b['batch']}: tokens/s {b['tokens_per_s']}, decode steps {b['decode_steps']}"
    elif skipped:
        out["error"] = f"batches {skipped} skipped (time budget)"
    return out


# ----- (d) scoring -----

def section_scoring(sz: Sizes, deadline: float, ctx: dict) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from mistral_jax.model import flops
    from mistral_jax.inference import scoring
    from mistral_jax.model import transformer as model_lib

    cfg, params = bf16_model(sz, ctx)
    ctx.pop("bf16_model", None)        # the last section that uses it
    rng = np.random.default_rng(4)
    lo, hi = sz.score_lengths
    reqs = []
    for _ in range(sz.score_requests):
        L = int(rng.integers(lo, hi + 1))
        reqs.append((rng.integers(3, cfg.vocab_size, L).tolist(), max(1, L // 2)))
    scorer = scoring.Scorer(params, cfg, dtype=jnp.bfloat16, batch_size=sz.score_batch,
                            max_input=sz.score_max_input, pack_length=sz.score_max_input, shrink_partial=False)
    t0 = time.perf_counter()
    first = scorer.score(reqs)
    first_s = time.perf_counter() - t0
    counted = {"tokens": 0}
    pos0 = scorer.positions_run

    def on_batch(_idx, _res, n_tokens):
        counted["tokens"] += n_tokens
    t0 = time.perf_counter()
    second = scorer.score(reqs, on_batch=on_batch)
    run_s = time.perf_counter() - t0
    positions = scorer.positions_run - pos0
    tokens = counted["tokens"]
    scored = sum(n for _, n in reqs)
    tps = tokens / run_s
    T = max(T for T in scorer.used_buckets)
    fpt = flops.forward_flops_per_token(cfg, T)
    chip = ctx["chip"]
    same = all(np.array_equal(a.logprobs, b.logprobs) for a, b in zip(first, second))
    lp_ok = all(np.all(np.isfinite(s.logprobs)) and np.all(s.logprobs <= 1e-3) for s in second)
    out = {"model": {**cfg.to_dict(), "n_params": model_lib.count_params(cfg)}, "dtype": "bfloat16",
           "requests": len(reqs), "lengths": [lo, hi], "max_input": sz.score_max_input, "batch_rows": scorer.rows,
           "input_tokens": tokens, "scored_tokens": scored, "positions_run": positions,
           "fill": tokens / positions if positions else None, "buckets": sorted(scorer.used_buckets),
           "first_call_s": first_s, "run_s": run_s, "tokens_per_s": tps, "scored_tokens_per_s": scored / run_s,
           "forward_flops_per_token": fpt,
           "mfu_approx": None if chip is None else flops.mfu(tps, fpt, chip.peak_bf16_flops),
           "repeat_identical": same, "logprobs_finite": lp_ok}
    out["status"] = "ok" if lp_ok and tps > 0 else "fail"
    if out["status"] != "ok":
        out["error"] = "non-finite or positive log-probabilities"
    return out


# ----- (e) LoRA memory -----

def section_lora_memory(sz: Sizes, deadline: float, ctx: dict) -> dict:
    import jax.numpy as jnp

    from mistral_jax.training import memory_plan
    from mistral_jax.model.config import ModelConfig

    cfg = ModelConfig.preset(sz.lora_model) if isinstance(sz.lora_model, str) else model_cfg(sz.lora_model)
    mem = ctx["device_memory"]
    rows, skipped = [], []
    for batch, seq in sz.lora_layouts:
        if rows and time.perf_counter() > deadline:
            skipped.append([batch, seq])
            continue
        t0 = time.perf_counter()
        p = memory_plan.plan(cfg, (1, 1, 1), seq, batch, remat="full", dtype=jnp.bfloat16,
                             param_dtype=jnp.bfloat16, lora_rank=sz.lora_rank, compile=True)
        total = p.total()
        rows.append({"batch": batch, "seq_len": seq, "compile_s": time.perf_counter() - t0,
                     "compiled": p.compiled, "state": {"params": p.params, "opt_state": p.opt_state,
                                                       "grads": p.grads, "batch": p.batch},
                     "n_params": p.n_params, "n_trained": p.n_trained, "total_bytes": total,
                     "device_memory": mem, "fits": None if mem is None else total <= mem})
    ok = rows and all(r["compiled"] and r["total_bytes"] > 0 for r in rows)
    out = {"model": sz.lora_model if isinstance(sz.lora_model, str) else "smoke", "config": cfg.to_dict(),
           "rank": sz.lora_rank, "remat": "full", "dtype": "bfloat16", "param_dtype": "bfloat16",
           "total": "argument + temp + generated code bytes of the compiled step (memory_plan.Plan.total)",
           "rows": rows, "skipped_layouts": skipped, "status": "ok" if ok and not skipped else "fail"}
    if not ok:
        out["error"] = "no compiled memory analysis"
    elif skipped:
        out["error"] = f"layouts {skipped} skipped (time budget)"
    return out


RUNNERS = {"a": section_attention, "b": section_train, "c": section_decode, "d": section_scoring,
           "e": section_lora_memory}


# ----- report -----

def _gib(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x / 2 ** 30:.2f} GiB" if x >= 2 ** 30 else f"{x / 2 ** 20:.2f} MiB"


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: Any, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def summary(key: str, s: dict) -> str:
    if s.get("status") == "error" or "status" not in s:
        return s.get("error", "")
    if key == "a":
        w = ", ".join(f"{d} {_num(e, '.1e')}" for d, e in s["worst_rel_err"].items())
        return (f"{s['passed']}/{s['runs']} runs pass ({', '.join(s['sizes']['backends'])}); worst rel err "
                f"of required backends: {w}" + (f"; {len(s['skipped'])} skipped" if s["skipped"] else ""))
    if key == "b":
        return (f"{s['model']['n_params'] / 1e9:.2f}B params, {s['batch']}x{s['seq_len']} tokens, remat "
                f"{s['remat']}, attn {s['attn_impl']}: {s['tokens_per_s']:.0f} tok/s, MFU {_pct(s['mfu'])} "
                f"(vs measured matmul {_pct(s['mfu_vs_measured_matmul'])})")
    if key == "c":
        return "; ".join(f"B={r['batch']}: {_num(r['tokens_per_s'], '.0f')} tok/s "
                         f"({_pct(r['of_roofline_spec'])} of spec roofline, {_pct(r['of_roofline_measured'])} "
                         f"of measured)" for r in s["rows"])
    if key == "d":
        return (f"{s['tokens_per_s']:.0f} input tok/s ({s['requests']} requests, fill {_pct(s['fill'])}, "
                f"MFU~ {_pct(s['mfu_approx'])})")
    if key == "e":
        return "; ".join(f"{s['model']} r{s['rank']} {r['batch']}x{r['seq_len']}: {_gib(r['total_bytes'])} "
                         f"of {_gib(r['device_memory'])}" + ("" if r["fits"] is None else
                                                             (" (fits)" if r["fits"] else " (DOES NOT FIT)"))
                         for r in s["rows"])
    return ""


def markdown(res: dict) -> str:
    m = res["meta"]
    chip = m["chip"]
    lines = [f"# device check: {m['device_kind']} ({m['platform']}), {m['mode']}, {m['date']}", "",
             f"jax {m['jax']}, flax {m['flax']}; chip table: "
             + ("unknown (MFU and spec rooflines not computed)" if chip is None else
                f"{chip['name']}, {chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
                f"{chip['hbm_bytes_per_s'] / 1e12:.2f} TB/s ({chip['source']})")
             + f"; device memory {_gib(m['device_memory'])} ({m['device_memory_source']}); "
               f"measured read bandwidth {_num(m.get('bandwidth_measured'), '.3g')} B/s; "
               f"wall {m['wall_s']:.0f} s of budget {m['time_budget_s']:.0f} s", "",
             "| section | status | result | wall s |", "|---|---|---|---|"]
    for key, name in SECTIONS.items():
        s = res["sections"].get(f"{key}_{name}")
        if s is None:
            continue
        text = summary(key, s).replace("|", "/")
        if s.get("status") not in ("ok", None) and s.get("error") and s.get("error") not in text:
            text = f"{text} -- {s['error']}" if text else s["error"]
        lines.append(f"| ({key}) {name} | {s.get('status')} | {text} | {_num(s.get('wall_s'), '.1f')} |")
    a = res["sections"].get("a_attention")
    if a and a.get("rows"):
        lines += ["", "## (a) attention against the dense oracle (max |err| / max |oracle|)", "",
                  "| T | rows | window | dtype | backend | out | dq | dk | dv | pass | fwd+bwd ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in a["rows"]:
            errs = " | ".join(_num(r.get(f"err_{t}"), ".1e") for t in ("out", "dq", "dk", "dv"))
            note = "" if r["required"] else " (probe)"
            if "error" in r:
                errs = f"{r['error'][:80].replace('|', '/')} | | |"
            lines.append(f"| {r['T']} | {r['case']} | {r['window']} | {r['dtype']} | {r['backend']}{note} | {errs} | "
                         f"{'yes' if r['pass'] else 'NO'} | {_num(r.get('fwd_bwd_ms'), '.1f')} |")
    c = res["sections"].get("c_decode")
    if c and c.get("rows"):
        lines += ["", "## (c) decode", "", "| batch | step ms | tok/s | roofline tok/s (spec) | of spec | "
                  "roofline tok/s (measured bw) | of measured |", "|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            lines.append(f"| {r['batch']} | {r['step_ms']:.2f} | {_num(r['tokens_per_s'], '.0f')} | "
                         f"{_num(r['roofline_tokens_per_s_spec'], '.0f')} | {_pct(r['of_roofline_spec'])} | "
                         f"{_num(r['roofline_tokens_per_s_measured'], '.0f')} | {_pct(r['of_roofline_measured'])} |")
    return "\n".join(lines) + "\n"


# ----- main -----

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="every section at tiny sizes (runs on CPU)")
    ap.add_argument("--out", default="device_check.json", help="JSON path; the markdown goes beside it (.md)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for all sections (default 420, smoke 300); each gets a share")
    ap.add_argument("--only", default="abcde", help="sections to run, e.g. 'a,c' (default all)")
    ap.add_argument("--force", action="store_true", help="run the full sizes even on a CPU")
    args = ap.parse_args(argv)
    keys = [k for k in SECTIONS if k in args.only.lower()]
    if not keys or any(c not in "abcde, " for c in args.only.lower()):
        ap.error(f"--only: letters from 'abcde', got {args.only!r}")
    # smoke: about a minute of work on two idle cores; the budget leaves room for a loaded machine
    budget_s = args.time_budget if args.time_budget is not None else (300.0 if args.smoke else 420.0)
    if budget_s <= 0:
        ap.error(f"--time-budget must be > 0, got {budget_s}")

    import flax
    import jax

    dev = jax.devices()[0]
    plat = dev.platform
    if plat == "cpu" and not args.smoke and not args.force:
        print("device_check: full sizes are meant for one GPU or TPU chip; this is a CPU (use --smoke, or --force)")
        return 2
    sz = SMOKE if args.smoke else FULL
    chip = chip_for(dev.device_kind)
    mem, mem_src = device_memory(dev, chip)
    out_path = Path(args.out)
    md_path = out_path.with_suffix(".md")
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "meta": {"device_kind": dev.device_kind, "platform": plat, "n_devices": len(jax.devices()),
                 "jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version(),
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "mode": "smoke" if args.smoke else "full", "argv": sys.argv[1:],
                 "chip": None if chip is None else dataclasses.asdict(chip),
                 "device_memory": mem, "device_memory_source": mem_src, "time_budget_s": budget_s,
                 "sizes": dataclasses.asdict(sz)},
        "sections": {},
    }
    lock = threading.Lock()

    def write(final: bool) -> None:
        with lock:
            res["meta"]["wall_s"] = time.perf_counter() - t_start
            res["ok"] = all(s.get("status") == "ok" for s in res["sections"].values()) and final
            text = json.dumps(clean(res), indent=1, allow_nan=False)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(text)
            md_path.write_text(markdown(clean(res)))

    def watchdog() -> None:
        with lock:
            for key in keys:
                s = res["sections"].setdefault(f"{key}_{SECTIONS[key]}", {})
                if "status" not in s or s["status"] == "running":
                    s.update(status="error", error=f"watchdog: the run passed its budget of {budget_s:.0f} s "
                                                   f"by {grace:.0f} s")
        write(False)
        print(markdown(clean(res)), flush=True)
        os._exit(3)

    grace = max(30.0, 0.15 * budget_s)
    timer = threading.Timer(budget_s + grace, watchdog)
    timer.daemon = True
    timer.start()

    ctx: dict[str, Any] = {"platform": plat, "chip": chip, "device_memory": mem}
    try:
        ctx["bandwidth_measured"] = measure_bandwidth(min(sz.bandwidth_bytes, int(0.05 * mem) if mem else
                                                          sz.bandwidth_bytes))
    except Exception as e:  # noqa: BLE001
        ctx["bandwidth_measured"] = None
        res["meta"]["bandwidth_error"] = one_line(e)
    res["meta"]["bandwidth_measured"] = ctx["bandwidth_measured"]

    budget = Budget(budget_s - (time.perf_counter() - t_start), keys)
    for key in keys:
        name = f"{key}_{SECTIONS[key]}"
        deadline = budget.section_deadline(key)
        with lock:
            res["sections"][name] = {"status": "running"}
        t0 = time.perf_counter()
        print(f"[device_check] ({key}) {SECTIONS[key]}: {deadline - t0:.0f} s budget", file=sys.stderr, flush=True)
        try:
            s = RUNNERS[key](sz, deadline, ctx)
        except Exception as e:  # noqa: BLE001 - one section's failure must not stop the others
            s = {"status": "error", "error": one_line(e),
                 "traceback": traceback.format_exc().strip().splitlines()[-12:]}
        s["wall_s"] = time.perf_counter() - t0
        s["budget_s"] = deadline - t0
        with lock:
            res["sections"][name] = s
        print(f"[device_check] ({key}) {s['status']} in {s['wall_s']:.1f} s"
              + (f": {s['error']}" if s.get("error") else ""), file=sys.stderr, flush=True)
        gc.collect()
        write(False)
    timer.cancel()
    write(True)
    print(md_path.read_text())
    print(f"wrote {out_path} and {md_path}", file=sys.stderr)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

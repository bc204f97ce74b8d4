"""Where the time goes: train and decode steps broken down by category, ours (XLA:CPU) vs HF (PyTorch).

    python bench/profile_breakdown.py --run train --variant scan-blockwise --steps 3 --json /tmp/prof/res.jsonl
    python bench/profile_breakdown.py --run decode --variant scan-blockwise --batch 1 --json ...
    python bench/profile_breakdown.py --run hf-train --json ...      # or hf-decode --batch 8
    python bench/profile_breakdown.py --report /tmp/prof/res.jsonl   # markdown tables from the JSON lines
    python bench/profile_breakdown.py --matvec-check                 # matvec alone, GROUP 16 vs 8

Each run is one process (run them one after the other, not in parallel). Shape: the 57M benchmark model
(dim 512, 8 layers, 8q/2kv heads of 64, hidden 1536, vocab 32000), float32. Train: 8 x 512 tokens, AdamW
with clipping (as bench/bench_train.py). Decode: one token per row against a 256-slot cache (window 256, as
bench/bench_decode.py) holding 128 positions, the cache donated as generate's loop carries it.

Ours: the compiled step runs under jax.profiler; XLA:CPU records one event per executed thunk (its HLO
instruction name). Each event's exclusive time (its duration less its nested events on the same thread) is
attributed by the instruction in `compiled.as_text()`: region first by the metadata source file / op_name
(attention core: attention.py, blockwise.py; loss: loss.py and the masked sum in train_step.py, which
includes the output-head matmul; optimizer: optax and train_step.py ops outside jvp/transpose;
embedding: embed.py), then kind (matmul: dot / convolution / fusions containing one, matvec.py's fused
reductions; transpose/copy: copy, transpose, dynamic-(update-)slice, concatenate, pad, fusions made of
data movement only, and fusions that write elementwise results out transposed (transpose + copy inside); while/scan overhead: the exclusive time of while / conditional / call thunks).
Variants: scan-blockwise (the default model), unscan-blockwise (scan_layers=False), scan-dense
(attn_impl="dense"; the train step takes it through make_train_step's loss_fn, the decode step through
Transformer(attn_impl=...)), unscan-dense.

HF: torch.profiler over the same steps; each aten op's self time goes to the region of its nearest
matching ancestor (scaled_dot_product / flash attention -> attention; cross_entropy / nll_loss /
log_softmax and any mm with a 32000 (vocab) dimension -> loss; optimizer step, clip_grad_norm_, zero_grad ->
optimizer), else by op (mm/addmm/bmm -> matmul; copy_/transpose/contiguous/clone/to -> copies).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CATS = ("matmul", "transpose/copy", "attention", "loss", "optimizer", "while/scan overhead", "embedding",
        "other (norms, RoPE, SwiGLU, residual)")
BATCH, SEQ = 8, 512
CACHE_LEN, FILLED, WINDOW = 256, 128, 256


def _load():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


# ----------------------------------------------------------------------------------------------------------
# HLO text -> per-instruction (opcode, op_name, source_file, called computations)

_INST = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s([\w\-]+)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
DATA_OPS = {"parameter", "copy", "transpose", "bitcast", "reshape", "slice", "dynamic-slice",
            "dynamic-update-slice", "concatenate", "pad", "broadcast", "constant", "tuple", "get-tuple-element",
            "bitcast-convert", "iota", "select", "reverse", "gather", "convert"}
COPY_OPS = {"copy", "transpose", "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "slice",
            "copy-start", "copy-done", "reverse", "broadcast"}
CONTROL_OPS = {"while", "conditional", "call"}


def parse_hlo(text: str):
    """(instructions, computation -> opcodes, computation -> called computations) of an HLO module's text.
    Each instruction: opcode, op_name, files (its metadata stack, innermost first), called computations."""
    comps: dict[str, list[str]] = {}          # computation -> opcodes
    calls_of: dict[str, list[str]] = {}       # computation -> called computations
    insts: dict[str, dict] = {}
    files, locs, frames = {}, {}, {}
    cur = None
    for line in text.splitlines():
        m = re.match(r'^(\d+) "(.*)"$', line)
        if m:
            files[int(m.group(1))] = m.group(2)   # FileNames (FunctionNames share the form; ids overlap, see below)
        m = re.match(r"^(\d+) \{file_name_id=(\d+) ", line)
        if m:
            locs[int(m.group(1))] = int(m.group(2))
        m = re.match(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}", line)
        if m:
            frames[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))
        if line and not line[0].isspace() and line.rstrip().endswith("{") and not line.startswith("HloModule"):
            m = _COMP.match(line)
            if m:
                cur = m.group(1)
                comps[cur], calls_of[cur] = [], []
            continue
        if line.strip() == "}":
            cur = None
            continue
        m = _INST.match(line)
        if not m or cur is None:
            continue
        name, opcode, rest = m.group(1), m.group(3), m.group(4)
        comps[cur].append(opcode)
        called = re.findall(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)", rest)
        called += [c for grp in re.findall(r"(?:calls|branch_computations)=\{([^}]*)\}", rest)
                   for c in re.findall(r"%?([\w.\-]+)", grp)]
        calls_of[cur].extend(called)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        src = re.search(r'source_file="([^"]*)"', rest)
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        insts[name] = {"opcode": opcode, "op_name": op_name.group(1) if op_name else "",
                       "frame": int(frame.group(1)) if frame else None, "src": src.group(1) if src else "",
                       "calls": called, "target": target.group(1) if target else "", "comp": cur}
    # FileNames come before FunctionNames in the text and both are "<id> \"<text>\"": keep the first table only
    file_names = {}
    in_files = False
    for line in text.splitlines():
        if line.strip() == "FileNames":
            in_files = True
            continue
        if in_files:
            m = re.match(r'^(\d+) "(.*)"$', line)
            if not m:
                break
            file_names[int(m.group(1))] = m.group(2)
    for inst in insts.values():
        stack, f, seen = [], inst["frame"], set()
        while f and f in frames and f not in seen:
            seen.add(f)
            loc, parent = frames[f]
            if loc in locs and locs[loc] in file_names:
                stack.append(file_names[locs[loc]])
            f = parent
        if inst["src"]:
            stack.insert(0, inst["src"])
        inst["files"] = stack
    return insts, comps, calls_of


def _ops_within(comp: str, comps, calls_of, seen=None) -> set[str]:
    seen = set() if seen is None else seen
    if comp in seen or comp not in comps:
        return set()
    seen.add(comp)
    out = set(comps[comp])
    for c in calls_of.get(comp, []):
        out |= _ops_within(c, comps, calls_of, seen)
    return out


def classify_inst(inst: dict | None, comps, calls_of) -> str:
    if inst is None:
        return "other (norms, RoPE, SwiGLU, residual)"
    op_name, opcode = inst["op_name"], inst["opcode"]
    bases = [os.path.basename(f) for f in inst["files"]]
    ours = [f for f in inst["files"] if "mistral_jax" in f or "optax" in f]
    inner = os.path.basename(ours[0]) if ours else ""
    if opcode in CONTROL_OPS:
        return "while/scan overhead"
    in_grad = "jvp(" in op_name or "transpose(" in op_name
    if any("optax" in f for f in inst["files"]) or (inner == "train_step.py" and not in_grad):
        return "optimizer"
    if "attention.py" in bases or "blockwise.py" in bases:
        return "attention"
    if "loss.py" in bases or inner == "train_step.py":
        return "loss"
    if "embed.py" in bases:
        return "embedding"
    if "matvec.py" in bases:
        return "matmul"
    ops = {opcode}
    for c in inst["calls"]:
        ops |= _ops_within(c, comps, calls_of)
    if ops & {"dot", "convolution"} or "dot" in inst["target"].lower() or "matmul" in inst["target"].lower():
        return "matmul"
    if opcode in COPY_OPS or (opcode == "fusion" and ops <= DATA_OPS | {"fusion"} and ops & COPY_OPS):
        return "transpose/copy"
    if opcode == "fusion" and {"transpose", "copy"} <= ops:
        return "transpose/copy"   # elementwise work written out transposed (a layout change for a dot)
    return "other (norms, RoPE, SwiGLU, residual)"


def exclusive_events(xspace_path: str, module_substr: str):
    """[(hlo_op, exclusive_ns, start_ns, end_ns)] of the thunk events of modules whose name contains module_substr."""
    from jax.profiler import ProfileData
    pd = ProfileData.from_file(xspace_path)
    out = []
    for plane in pd.planes:
        for line in plane.lines:
            evs = []
            for e in line.events:
                stats = dict(e.stats)
                if "hlo_op" not in stats or module_substr not in str(stats.get("hlo_module", "")):
                    continue
                evs.append([e.start_ns, e.start_ns + e.duration_ns, stats["hlo_op"], e.duration_ns])
            evs.sort(key=lambda x: (x[0], -x[1]))
            stack: list[list] = []
            for ev in evs:
                while stack and stack[-1][1] <= ev[0]:
                    stack.pop()
                if stack:
                    stack[-1][3] -= ev[1] - ev[0]      # nested: not the parent's own time
                stack.append(ev)
            out.extend((ev[2], ev[3], ev[0], ev[1]) for ev in evs)
    return out


def profile_compiled(compiled, run_one, steps: int, module_substr: str, tag: str):
    """Runs run_one() `steps` times under the profiler; returns (median step s, per-category ns per step,
    top instructions)."""
    import jax
    insts, comps, calls_of = parse_hlo(compiled.as_text())
    trace_dir = tempfile.mkdtemp(prefix=f"trace_{tag}_", dir="/tmp/prof")
    times = []
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
        t0 = time.perf_counter()
        run_one()
        times.append(time.perf_counter() - t0)
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    per_cat: dict[str, float] = collections.defaultdict(float)
    per_inst: dict[str, float] = collections.defaultdict(float)
    for op, excl, _, _ in exclusive_events(path, module_substr):
        cat = classify_inst(insts.get(op), comps, calls_of)
        per_cat[cat] += excl / steps
        per_inst[op] += excl / steps
    base = trace_dir + "/"
    with open(base + "module.hlo.txt", "w") as f:
        f.write(compiled.as_text())
    with open(base + "per_inst.json", "w") as f:
        json.dump(per_inst, f)
    top = sorted(per_inst.items(), key=lambda kv: -kv[1])[:25]
    top = [(op, ns, classify_inst(insts.get(op), comps, calls_of), insts.get(op, {}).get("opcode", "?"),
            insts.get(op, {}).get("op_name", "")[-110:]) for op, ns in top]
    return statistics.median(times), dict(per_cat), top, times, base


def reclassify(base: str) -> dict[str, float]:
    """Per-category ns of a saved run (module.hlo.txt + per_inst.json under `base`), by the current rules."""
    insts, comps, calls_of = parse_hlo(open(base + "module.hlo.txt").read())
    cats: dict[str, float] = collections.defaultdict(float)
    for op, ns in json.load(open(base + "per_inst.json")).items():
        cats[classify_inst(insts.get(op), comps, calls_of)] += ns
    return dict(cats)


# ----------------------------------------------------------------------------------------------------------
# ours

def _cfg(window=None):
    from mistral_jax.model.config import ModelConfig
    return ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=1536,
                       vocab_size=32000, sliding_window=window or 4096, max_seq_len=4096)


def _variant(v: str) -> tuple[bool, str]:
    scan, impl = v.split("-")
    return scan == "scan", impl


def run_ours_train(variant: str, steps: int):
    import jax
    import numpy as np
    from mistral_jax.training import optim
    from mistral_jax.model import sharding
    from mistral_jax.training import train_step as ts
    from mistral_jax.training.run_config import OptimSection
    scan, impl = _variant(variant)
    cfg = _cfg()
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    o = OptimSection(lr=1e-4, warmup_steps=0)
    opt = optim.make_optimizer(o, 1000)
    # make_train_step has no attention switch: its loss_fn is summed_loss with the model built here
    loss_fn = functools.partial(_summed_loss_impl, attn_impl=impl, scan_layers=scan)
    step = ts.make_train_step(cfg, opt, optim.learning_rate_schedule(o, 1000), mesh, scan_layers=scan,
                              loss_fn=loss_fn)
    state = ts.init_state(cfg, opt, jax.random.key(0), mesh)
    if not scan:
        from mistral_jax.model import transformer as model_lib
        p = model_lib.unstack_layers(state["params"], cfg.n_layers)
        sh = ts.state_shardings(cfg, opt, mesh, scan_layers=False)
        state = {"step": state["step"], "params": jax.device_put(p, sh["params"]),
                 "opt_state": jax.jit(opt.init, out_shardings=sh["opt_state"])(p)}
    rng = np.random.default_rng(0)
    host = {"tokens": rng.integers(3, cfg.vocab_size, (BATCH, SEQ)).astype(np.int32),
            "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
            "segment_ids": np.ones((BATCH, SEQ), np.int32)}
    b = ts.put_batch(host, mesh, 1)
    t0 = time.perf_counter()
    compiled = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    box = {"s": state}

    def run_one():
        box["s"], m = compiled(box["s"], b)
        jax.block_until_ready(m["loss"])
    run_one()  # warm-up
    med, cats, top, times, base = profile_compiled(compiled, run_one, steps, "step", f"train_{variant}")
    return {"compile_s": compile_s, "median_s": med, "times": times, "cats_ns": cats, "top": top, "saved": base}


def _summed_loss_impl(params, tokens_BT, positions_BT, segment_ids_BT, *, cfg, dtype, remat, attn_impl,
                      scan_layers, target_mask_BT=None):
    """train_step.summed_loss with the attention implementation chosen (same maths, same chunked loss)."""
    import jax.numpy as jnp
    from mistral_jax.model import transformer as model_lib
    from mistral_jax.model import sharding
    from mistral_jax.training import train_step as ts
    from mistral_jax.training.loss import chunked_nll
    model = model_lib.Transformer(cfg, dtype=dtype, remat=remat, scan_layers=scan_layers, attn_impl=attn_impl)
    with sharding.with_rules():
        h_BTD, _ = model.apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT, return_hidden=True)
    nll_BT = chunked_nll(h_BTD, params["output"], jnp.roll(tokens_BT, -1, axis=1), ts.LOSS_CHUNK)
    mask_BT = ts.loss_mask(segment_ids_BT, target_mask_BT)
    return jnp.sum(jnp.where(mask_BT, nll_BT, 0.0)), jnp.sum(mask_BT).astype(jnp.float32)


def filled_cache(cfg, batch: int):
    """A stacked cache of CACHE_LEN slots holding positions 0 .. FILLED-1, random keys and values."""
    import jax
    import jax.numpy as jnp
    from mistral_jax.model import cache as kv_cache
    cache = kv_cache.init_cache(cfg, batch, CACHE_LEN)
    pos = jnp.where(jnp.arange(CACHE_LEN) < FILLED, jnp.arange(CACHE_LEN), -1).astype(jnp.int32)
    cache["pos"] = jnp.broadcast_to(pos, cache["pos"].shape)
    filled = (cache["pos"] >= 0)[..., None, None]
    cache["k"] = jax.random.normal(jax.random.key(1), cache["k"].shape) * filled
    cache["v"] = jax.random.normal(jax.random.key(2), cache["v"].shape) * filled
    return cache


def run_ours_decode(variant: str, batch: int, steps: int, fused_mode: str = "auto"):
    import jax
    import jax.numpy as jnp
    from mistral_jax.inference import decode
    from mistral_jax.model import matvec
    from mistral_jax.model import packing
    from mistral_jax.model import sharding
    from mistral_jax.model import transformer as model_lib
    scan, impl = _variant(variant)
    cfg = _cfg(WINDOW)
    params = model_lib.init_params(cfg, jax.random.key(0))
    if not scan:
        params = model_lib.unstack_layers(params, cfg.n_layers)
    fused = decode.uses_fused_matvec(None) if fused_mode == "auto" else fused_mode == "on"

    # decode.compile_step's program, with the attention implementation chosen and the cache donated (as
    # generate's while loop carries it; an undonated cache would add a copy of the whole cache per step)
    def step(params, tok_B, pos_B, cache, head_VD):
        with sharding.with_rules():
            logits_B1V, cache = model_lib.Transformer(cfg, dtype=jnp.float32, fused_matvec=fused,
                                                      scan_layers=scan, attn_impl=impl).apply(
                {"params": params}, tok_B[:, None], pos_B[:, None], cache=cache, head_VD=head_VD)
        return logits_B1V[:, 0], cache

    cache = filled_cache(cfg, batch)
    packed = packing.pack(params)
    # the head transposed as generate passes it (once per head, outside the steps)
    head_VD = decode.transposed_head(packed["output"]) if decode.uses_transposed_head(packed, batch, fused) else None
    tok = jnp.full((batch,), 5, jnp.int32)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(3,)).lower(packed, tok, tok, cache, head_VD).compile(
        compiler_options=matvec.compiler_options(fused))
    compile_s = time.perf_counter() - t0
    box = {"c": cache}
    pos_B = jnp.full((batch,), FILLED, jnp.int32)

    def run_one():  # a decode step writes slot FILLED; positions stay at FILLED so each step does the same work
        logits, box["c"] = compiled(packed, tok, pos_B, box["c"], head_VD)
        jax.block_until_ready(logits)
    for _ in range(3):
        run_one()
    med, cats, top, times, base = profile_compiled(compiled, run_one, steps, "step", f"decode{batch}_{variant}")
    return {"compile_s": compile_s, "median_s": med, "times": times, "cats_ns": cats, "top": top, "saved": base,
            "fused_matvec": fused}


# ----------------------------------------------------------------------------------------------------------
# HF

def _hf_model():
    import torch
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    return torch, MistralConfig, MistralForCausalLM


ATTN_PAT = ("scaled_dot_product", "flash_attention", "scaleddotproduct", "flashattention", "sdpa")
LOSS_PAT = ("cross_entropy", "nll_loss", "log_softmax", "nllloss", "logsoftmax")
OPT_PAT = ("optimizer.step", "adamw", "clip_grad", "zero_grad", "_foreach")
MM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")
COPIES = ("aten::copy_", "aten::transpose", "aten::contiguous", "aten::clone", "aten::t", "aten::_to_copy",
          "aten::to", "aten::permute", "aten::reshape", "aten::view", "aten::expand", "aten::cat",
          "aten::_unsafe_view", "aten::as_strided", "aten::slice", "aten::unsqueeze", "aten::select", "aten::index")


def _hf_cat(evt, vocab: int | None) -> str:
    a = evt
    while a is not None:
        n = a.name.lower()
        if any(p in n for p in ATTN_PAT):
            return "attention"
        if any(p in n for p in LOSS_PAT):
            return "loss"
        if any(p in n for p in OPT_PAT):
            return "optimizer"
        if "embedding" in n:
            return "embedding"
        a = a.cpu_parent
    name = evt.name
    if vocab and str(vocab) in str(getattr(evt, "input_shapes", "")):
        return "loss"       # the output head's matmuls and the float32 logits' copies (train step only)
    if name in MM:
        return "matmul"
    if name in COPIES:
        return "transpose/copy"
    return "other (norms, RoPE, SwiGLU, residual)"


def _hf_profile(run_one, steps: int, vocab: int | None):
    from torch.profiler import ProfilerActivity, profile
    times = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            run_one()
            times.append(time.perf_counter() - t0)
    cats: dict[str, float] = collections.defaultdict(float)
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in prof.events():
        if not e.name.startswith("aten::") and not e.name.startswith("Optimizer"):
            continue
        us = e.self_cpu_time_total
        cats[_hf_cat(e, vocab)] += us * 1e3 / steps
        per_op[e.name] += us * 1e3 / steps
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:20]
    return statistics.median(times), dict(cats), [(k, v, "", "", "") for k, v in top], times


def run_hf_train(steps: int):
    torch, MistralConfig, MistralForCausalLM = _hf_model()
    c = _cfg()
    hf_cfg = MistralConfig(**c.to_hf_config())
    model = MistralForCausalLM(hf_cfg).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    import numpy as np
    ids = torch.from_numpy(np.random.default_rng(0).integers(3, c.vocab_size, (BATCH, SEQ))).long()

    def run_one():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with torch.profiler.record_function("clip_grad_norm_"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.profiler.record_function("zero_grad"):
            opt.zero_grad(set_to_none=True)
    run_one()
    med, cats, top, times = _hf_profile(run_one, steps, c.vocab_size)
    return {"median_s": med, "times": times, "cats_ns": cats, "top": top,
            "attn_implementation": getattr(model.config, "_attn_implementation", "?")}


def run_hf_decode(batch: int, steps: int):
    torch, MistralConfig, MistralForCausalLM = _hf_model()
    c = _cfg(WINDOW)
    hc = MistralConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                       num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                       head_dim=c.head_dim, sliding_window=WINDOW, max_position_embeddings=65536, rms_norm_eps=1e-5)
    hf = MistralForCausalLM(hc).eval()
    import numpy as np
    prompt = torch.from_numpy(np.random.default_rng(0).integers(3, c.vocab_size, (batch, FILLED))).long()
    from transformers import DynamicCache
    with torch.no_grad():
        out = hf(input_ids=prompt, cache=DynamicCache(config=hc), use_cache=True)
    base_cache = getattr(out, "cache", None) or out.past_key_values
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    pos = torch.full((batch, 1), FILLED, dtype=torch.long)

    def run_one():
        # one decode step as generate runs it: forward one token against the cache, greedy pick; the cache is
        # cropped back after each step so every step sees FILLED cached positions
        with torch.no_grad():
            o = hf(input_ids=tok, cache=base_cache, position_ids=pos, use_cache=True)
            o.logits[:, -1].argmax(-1)
        base_cache.crop(-1)   # drop the token just written
    for _ in range(3):
        run_one()
    med, cats, top, times = _hf_profile(run_one, steps, None)   # no loss: the head's mm is a matmul
    return {"median_s": med, "times": times, "cats_ns": cats, "top": top,
            "attn_implementation": getattr(hf.config, "_attn_implementation", "?")}


def matvec_group_check(repeats: int = 30) -> None:
    """matvec.matvec alone at the 57M decode shapes, GROUP 16 (the default) vs 8: time and whether XLA kept the two
    stages in separate fusions (with 32 partials it merges them into one reduce-of-reduce loop fusion)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from mistral_jax.model import matvec
    default = matvec.GROUP
    print("| weight (Din x Dout) | GROUP | partials | ms | M weights / ms | fusions | stages merged |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    try:
        for din, dout in ((512, 32000), (512, 1536), (1536, 512)):
            for g in (16, 8):
                matvec.GROUP = g
                f = jax.jit(lambda x, w: matvec.matvec(x, w))
                x = jnp.ones((1, din))
                w = jnp.asarray(np.random.default_rng(0).random((din, dout), np.float32))
                c = f.lower(x, w).compile(compiler_options=matvec.CPU_COMPILER_OPTIONS)
                txt = c.as_text()
                n_fus = len(re.findall(r"^\s*(?:ROOT )?%\S+ = \S+ fusion\(", txt, re.M))
                merged = any(blk.count(" reduce(") >= 2 for blk in txt.split("\n\n"))
                c(x, w).block_until_ready()
                ts = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    c(x, w).block_until_ready()
                    ts.append(time.perf_counter() - t0)
                ms = statistics.median(ts) * 1e3
                print(f"| {din} x {dout} | {g} | {din // g} | {ms:.2f} | {din * dout / 1e6 / ms:.2f} | {n_fus} | "
                      f"{'yes' if merged else 'no'} |")
    finally:
        matvec.GROUP = default


# ----------------------------------------------------------------------------------------------------------
# report

COLS = ("scan-blockwise", "unscan-blockwise", "scan-dense", "unscan-dense", "hf")
COL_NAMES = {"scan-blockwise": "ours: scanned, blockwise (default)", "unscan-blockwise": "ours: scan_layers=False",
             "scan-dense": "ours: scanned, dense attention", "unscan-dense": "ours: unscanned, dense",
             "hf": "HF PyTorch (eager)"}


def report(path: str) -> str:
    rows = [json.loads(x) for x in open(path) if x.strip()]
    by = {}
    for r in rows:
        if r.get("saved") and os.path.exists(r["saved"] + "per_inst.json"):
            r["cats_ns"] = reclassify(r["saved"])
        by[(r["run"], r.get("batch"), r["variant"])] = r      # last one wins
    out = []
    for run, batch, title in (("train", None, f"Train step ({BATCH} x {SEQ} tokens, float32, AdamW + clipping)"),
                              ("decode", 1, f"Decode step, batch 1 ({CACHE_LEN}-slot cache, {FILLED} filled)"),
                              ("decode", 8, f"Decode step, batch 8 ({CACHE_LEN}-slot cache, {FILLED} filled)")):
        cols = [c for c in COLS if (run, batch, c) in by]
        if not cols:
            continue
        unit, scale = ("s", 1.0) if run == "train" else ("ms", 1e3)
        out.append(f"\n### {title}\n")
        out.append("Share of summed op time (%) per category; last rows: summed op time and median wall time "
                   f"per step ({unit}).\n")
        out.append("| category | " + " | ".join(COL_NAMES[c] for c in cols) + " |")
        out.append("| --- |" + " ---: |" * len(cols))
        tot = {c: sum(by[(run, batch, c)]["cats_ns"].values()) for c in cols}
        for cat in CATS:
            cells = []
            for c in cols:
                ns = by[(run, batch, c)]["cats_ns"].get(cat, 0.0)
                cells.append(f"{100 * ns / tot[c]:.1f}% ({ns * 1e-9 * scale:.3g})" if ns else "-")
            out.append(f"| {cat} | " + " | ".join(cells) + " |")
        out.append(f"| summed op time ({unit}) | " + " | ".join(f"{tot[c] * 1e-9 * scale:.3g}" for c in cols) + " |")
        out.append(f"| median wall per step ({unit}) | "
                   + " | ".join(f"{by[(run, batch, c)]['median_s'] * scale:.3g}" for c in cols) + " |")
        out.append("\nLoad average before/after each run: " + "; ".join(
            f"{c}: {by[(run, batch, c)]['load_before']} -> {by[(run, batch, c)]['load_after']}" for c in cols))
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", choices=("train", "decode", "hf-train", "hf-decode"))
    p.add_argument("--variant", default="scan-blockwise",
                   choices=("scan-blockwise", "unscan-blockwise", "scan-dense", "unscan-dense"))
    p.add_argument("--batch", type=int, default=1, help="decode batch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--fused", choices=("auto", "on", "off"), default="auto",
                   help="decode: fused matvec products (auto: as generate, on the CPU backend)")
    p.add_argument("--matvec-group", type=int, default=0,
                   help="decode: set matvec.GROUP to this before compiling (0: leave the library's)")
    p.add_argument("--json", default="/tmp/prof/res.jsonl")
    p.add_argument("--report", metavar="JSONL")
    p.add_argument("--top", action="store_true", help="print the most expensive instructions/ops")
    p.add_argument("--matvec-check", action="store_true",
                   help="time matvec.matvec alone at the decode shapes, GROUP 16 vs 8 (see matvec_group_check)")
    a = p.parse_args(argv)
    if a.matvec_check:
        matvec_group_check()
        return
    if a.report:
        print(report(a.report))
        return
    os.makedirs("/tmp/prof", exist_ok=True)
    before = _load()
    if a.matvec_group:
        from mistral_jax.model import matvec
        matvec.GROUP = a.matvec_group
    if a.run == "train":
        r = run_ours_train(a.variant, a.steps)
    elif a.run == "decode":
        r = run_ours_decode(a.variant, a.batch, a.steps, a.fused)
    elif a.run == "hf-train":
        r = run_hf_train(a.steps)
    else:
        r = run_hf_decode(a.batch, a.steps)
    r.update(run=a.run.replace("hf-", ""), variant="hf" if a.run.startswith("hf") else
             a.variant + ("" if a.fused == "auto" else f"-fused{a.fused}")
             + (f"-group{a.matvec_group}" if a.matvec_group else ""),
             batch=a.batch if "decode" in a.run else None, load_before=before, load_after=_load(), steps=a.steps)
    with open(a.json, "a") as f:
        f.write(json.dumps(r) + "\n")
    tot = sum(r["cats_ns"].values())
    print(f"{a.run} {a.variant} batch={r['batch']}: median {r['median_s']:.4f} s, times "
          f"{[round(t, 4) for t in r['times']]}, summed op time {tot * 1e-9:.4f} s/step, load {before} -> "
          f"{r['load_after']}")
    for cat, ns in sorted(r["cats_ns"].items(), key=lambda kv: -kv[1]):
        print(f"  {cat:40s} {100 * ns / tot:5.1f}%  {ns * 1e-9:.4f} s")
    if a.top:
        for row in r["top"]:
            print("   ", f"{row[1] * 1e-9:.4f}s", *row[0:1], *row[2:])


if __name__ == "__main__":
    main()

"""Same-XLA reference: Hugging Face's Flax Mistral port (transformers 4.57.x), timed on the same weights.

Runs under its own venv (transformers 5 has no Flax models), not the repo's Python; imports nothing from
mistral_jax. The main benches write the weights they use to a Hugging Face folder and call this script
in a subprocess; it prints one JSON line on stdout (progress and warnings go to stderr).

    python -m venv /work/venvs/hfflax
    /work/venvs/hfflax/bin/pip install transformers==4.57.6 flax==0.12.8 jax==0.10.2 jaxlib==0.10.2 \\
        optax==0.2.8 safetensors numpy
    /work/venvs/hfflax/bin/python bench/hf_flax_ref.py decode FOLDER --batches 1 8 --prompt-len 64 --new 128
    /work/venvs/hfflax/bin/python bench/hf_flax_ref.py train FOLDER --batch 8 --seq 512 --steps 3 \\
        --dtypes float32 bfloat16

FOLDER holds config.json + model.safetensors (HF names and layouts, float32 or bf16). The weights are
read with safetensors' numpy reader and placed into the Flax param tree here (kernels are the torch
weights transposed), so neither torch nor a `format` entry in the safetensors metadata is needed.

decode: `jax.jit` of FlaxMistralForCausalLM.generate (greedy, params an argument of the jitted function,
eos = the vocab size, a token that cannot be drawn, so every row generates all tokens). Per batch size:
one compiling call of each length, untimed; then the median of --repeats calls generating `new` tokens
and of calls generating 1 token. The decode step is (t(new) - t(1)) / (new - 1) (two programs, whose caches
are prompt+new and prompt+1 slots long: the port's cache is a full-length buffer, not a rolling one);
call tokens/s is batch * new / t(new), prefill included, as bench_decode.py's table counts it.

train: a jitted step on the Flax params: forward (module.apply, deterministic), next-token cross-entropy
(mean over B x (T-1) targets, float32 logits), grads, optax clip_by_global_norm(1.0) + adamw(1e-4,
b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on matrices), params and optimizer state donated. dtype
`bfloat16` is the port's `dtype=` (compute dtype; params stay float32). Step times: --warmup untimed
steps (the first compiles), then --steps timed ones; the median is reported.

score: per-token log-probs of scoring requests (a JSON file: [[tokens, n_score], ...], as bench_eval.py
builds them): length-sorted batches of --batch, right-padded to the longest rounded up to a multiple of
--pad-to (fewer programs), one jitted forward + float32 log-softmax + gather per batch shape. Times a
first pass (compilation included) and a second (compiled) pass; returns the scored log-probs.

Note: the port's sliding-window mask (jnp.triu(causal, k=-W)) admits W+1 keys where Mistral admits W,
so values differ from Mistral's once a sequence is longer than W; at the bench shapes (decode: window 256,
64 + 128 tokens; train: window 4096, 512 tokens) it never applies, but compare speed, not values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import ref_venv  # bench/ (this script's folder, first on sys.path)


REFERENCE = ref_venv.Reference(Path(__file__), Path("/work/venvs/hfflax/bin/python"), "--hf-flax-python",
                               "transformers 4.57.x + flax for the HF Flax (jit) reference")


def log(msg: str) -> None:
    print(f"# hf_flax_ref: {msg}", file=sys.stderr, flush=True)


def load(folder: Path, max_pos: int, dtype):
    """(FlaxMistralForCausalLM without random init, its Flax params from the folder's safetensors)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import FlaxMistralForCausalLM, MistralConfig

    raw = json.loads((folder / "config.json").read_text())
    theta = raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    n_heads = raw["num_attention_heads"]
    head_dim = raw.get("head_dim") or raw["hidden_size"] // n_heads
    if head_dim * n_heads != raw["hidden_size"]:
        raise SystemExit(f"the Flax port needs head_dim * heads == hidden_size, got {head_dim} x {n_heads}")
    # max_position_embeddings only sizes the port's RoPE table and its (max_pos x max_pos) mask, built
    # per layer: the checkpoint's 4096 or 32768 would cost memory for nothing, so it is cut to what is used.
    cfg = MistralConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=n_heads,
        num_key_value_heads=raw["num_key_value_heads"], head_dim=head_dim, sliding_window=raw.get("sliding_window"),
        max_position_embeddings=max_pos, rms_norm_eps=raw.get("rms_norm_eps", 1e-5), rope_theta=float(theta),
        tie_word_embeddings=False, bos_token_id=raw.get("bos_token_id", 1), eos_token_id=raw.get("eos_token_id", 2),
        attention_dropout=0.0)
    model = FlaxMistralForCausalLM(cfg, dtype=dtype, _do_init=False)

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{folder}: no .safetensors file")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))

    def w(name):
        x = sd.pop(name)
        return np.asarray(x, np.float32)

    layers = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layers[str(i)] = {
            "self_attn": {n: {"kernel": w(p + f"self_attn.{n}.weight").T} for n in ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj")},
            "mlp": {n: {"kernel": w(p + f"mlp.{n}.weight").T} for n in ("gate_proj", "up_proj", "down_proj")},
            "input_layernorm": {"weight": w(p + "input_layernorm.weight")},
            "post_attention_layernorm": {"weight": w(p + "post_attention_layernorm.weight")},
        }
    params = {"model": {"embed_tokens": {"embedding": w("model.embed_tokens.weight")},
                        "layers": layers, "norm": {"weight": w("model.norm.weight")}},
              "lm_head": {"kernel": w("lm_head.weight").T}}
    if sd:
        raise SystemExit(f"unused tensors in the checkpoint: {sorted(sd)[:5]}")
    want = jax.eval_shape(lambda: model.module.init(jax.random.PRNGKey(0), jnp.ones((1, 1), "i4"),
                                                    jnp.ones((1, 1), "i4"), jnp.zeros((1, 1), "i4"))["params"])
    got_shapes = jax.tree_util.tree_map(lambda x: x.shape, params)
    want_shapes = jax.tree_util.tree_map(lambda x: x.shape, dict(want))
    if got_shapes != want_shapes:
        raise SystemExit(f"param tree mismatch:\n{got_shapes}\nvs\n{want_shapes}")
    params = jax.device_put(jax.tree_util.tree_map(np.ascontiguousarray, params))
    return model, cfg, params


def run_decode(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    model, cfg, params = load(a.folder, max_pos=_round_up(a.prompt_len + a.new, 256), dtype=jnp.float32)
    rs = np.random.RandomState(a.seed)
    out = []
    for b in a.batches:
        prompts = jnp.asarray(rs.randint(3, cfg.vocab_size, (b, a.prompt_len)), jnp.int32)

        def generate(k, prompts=prompts):
            @jax.jit
            def gen(p, ids):
                return model.generate(ids, params=p, max_new_tokens=k, do_sample=False,
                                      eos_token_id=cfg.vocab_size, pad_token_id=0).sequences
            return lambda: gen(params, prompts)
        out.append(ref_venv.time_decode(b, a.prompt_len, a.new, a.repeats, generate, a.return_tokens, log))
    return {"mode": "decode", "prompt_len": a.prompt_len, "new": a.new, "seed": a.seed, "repeats": a.repeats,
            "results": out}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def run_train(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    out = []
    for dt in a.dtypes:
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dt]
        model, cfg, params = load(a.folder, max_pos=_round_up(a.seq, 256), dtype=dtype)
        rs = np.random.default_rng(a.seed)
        ids = jnp.asarray(rs.integers(3, cfg.vocab_size, (a.batch, a.seq)), jnp.int32)
        mask = jnp.ones_like(ids)
        pos = jnp.broadcast_to(jnp.arange(a.seq, dtype=jnp.int32), ids.shape)
        decay = jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
        opt = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=decay))
        opt_state = opt.init(params)

        def loss_fn(p):
            logits = model.module.apply({"params": p}, ids, mask, pos, deterministic=True).logits
            logits = logits[:, :-1].astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        @partial(jax.jit, donate_argnums=(0, 1))
        def step(p, s):
            loss, g = jax.value_and_grad(loss_fn)(p)
            upd, s = opt.update(g, s, p)
            return optax.apply_updates(p, upd), s, loss

        times, losses = [], []
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            params, opt_state, loss = step(params, opt_state)
            loss = float(loss)
            dt_s = time.perf_counter() - t0
            losses.append(loss)
            if i >= a.warmup:
                times.append(dt_s)
            log(f"train {dt} step {i}: {dt_s:.2f} s, loss {loss:.4f}{' (warm-up)' if i < a.warmup else ''}")
        med = statistics.median(times)
        out.append({"dtype": dt, "step_times_s": times, "median_s": med, "tokens_per_s": a.batch * a.seq / med,
                    "losses": losses})
        del params, opt_state, step
    return {"mode": "train", "batch": a.batch, "seq": a.seq, "warmup": a.warmup, "steps": a.steps,
            "results": out}


def run_score(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    reqs = json.loads(Path(a.requests).read_text())
    longest = max(len(t) - 1 for t, _ in reqs)
    model, cfg, params = load(a.folder, max_pos=_round_up(longest, a.pad_to), dtype=jnp.float32)

    @jax.jit
    def target_logprobs(p, inp, att, tgt):
        pos = jnp.broadcast_to(jnp.arange(inp.shape[1], dtype=jnp.int32), inp.shape)
        logits = model.module.apply({"params": p}, inp, att, pos, deterministic=True).logits
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]

    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][0]))
    shapes = set()

    def one_pass():
        out = [None] * len(reqs)
        for s in range(0, len(order), a.batch):
            idx = order[s:s + a.batch]
            L = _round_up(max(len(reqs[i][0]) - 1 for i in idx), a.pad_to)
            inp, att, tgt = (np.zeros((a.batch, L), np.int32) for _ in range(3))
            for r, i in enumerate(idx):
                t = reqs[i][0]
                inp[r, :len(t) - 1], att[r, :len(t) - 1], tgt[r, :len(t) - 1] = t[:-1], 1, t[1:]
            att[len(idx):, 0] = 1          # filler rows of a short last batch: one visible token, ignored
            shapes.add((a.batch, L))
            lp = np.asarray(target_logprobs(params, inp, att, tgt))
            for r, i in enumerate(idx):
                t, n = reqs[i]
                out[i] = lp[r, len(t) - 1 - n:len(t) - 1].tolist()
        return out

    t0 = time.perf_counter()
    one_pass()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    lps = one_pass()
    second = time.perf_counter() - t0
    log(f"score: first pass {first:.2f} s, compiled {second:.2f} s, shapes {sorted(shapes)}")
    return {"mode": "score", "batch": a.batch, "pad_to": a.pad_to, "first_pass_s": first, "compiled_s": second,
            "shapes": sorted(shapes), "logprobs": lps}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("decode", "train", "score"))
    p.add_argument("folder", type=Path, help="HF folder: config.json + model.safetensors")
    p.add_argument("--seed", type=int, default=0, help="prompts / batch tokens")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="decode")
    p.add_argument("--prompt-len", type=int, default=64, help="decode")
    p.add_argument("--new", type=int, default=128, help="decode")
    p.add_argument("--repeats", type=int, default=3, help="decode: median of this many calls")
    p.add_argument("--return-tokens", action="store_true", help="decode: include the generated tokens")
    p.add_argument("--batch", type=int, default=8, help="train, score")
    p.add_argument("--seq", type=int, default=512, help="train")
    p.add_argument("--steps", type=int, default=3, help="train: timed steps")
    p.add_argument("--warmup", type=int, default=1, help="train: untimed steps (the first compiles)")
    p.add_argument("--requests", help="score: JSON file of [tokens, n_score] pairs")
    p.add_argument("--pad-to", type=int, default=64, help="score: batch lengths rounded up to this multiple")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"))
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import flax
    import jax
    import transformers
    res = {"decode": run_decode, "train": run_train, "score": run_score}[a.mode](a)
    res.update({"impl": "HF Flax (jit)", "transformers": transformers.__version__, "flax": flax.__version__,
                "jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count()})
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

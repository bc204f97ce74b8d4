"""Second JAX reference: EasyDeL's Mistral (easydel 0.3.0 with its own jax 0.9.2), timed on the same weights.

Runs under its own venv (EasyDeL pins its jax), not the repo's Python; imports nothing from mistral_jax. The
main benches write their weights as a Hugging Face folder and call this script in a subprocess
(bench/ref_venv.py); it prints one JSON line on stdout (progress and warnings go to stderr).

    python -m venv /work/venvs/easydel
    /work/venvs/easydel/bin/pip install torch==2.13.0        # first: the CPU wheel (EasyDeL needs torch)
    /work/venvs/easydel/bin/pip install easydel==0.3.0 pillow
    /work/venvs/easydel/bin/python bench/easydel_ref.py decode FOLDER --batches 1 8 --prompt-len 64 --new 128

The model is loaded as a user would load it: `AutoEasyDeLModelForCausalLM.from_pretrained(FOLDER)` in float32
(params and compute, default matmul precision, no automatic sharding), with the attention EasyDeL picks.

decode: EasyDeL's `generate` (greedy, eos = the vocab size, a token that cannot be drawn, so every row
generates all tokens) inside `jax.jit` over the model's nnx state, under the model's mesh. Per batch size:
one compiling call of each length, untimed; then the median of --repeats calls generating `new` tokens and of
calls generating 1 token. The decode step is (t(new) - t(1)) / (new - 1); call tokens/s is batch * new /
t(new), prefill included, as bench_decode.py counts it. The same JSON shape as hf_flax_ref.py's decode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import ref_venv  # bench/ (this script's folder, first on sys.path)

REFERENCE = ref_venv.Reference(Path(__file__), Path("/work/venvs/easydel/bin/python"), "--easydel-python",
                               "easydel 0.3.0 for the EasyDeL (jit) reference")


def log(msg: str) -> None:
    print(f"# easydel_ref: {msg}", file=sys.stderr, flush=True)


def run_decode(a) -> dict:
    import easydel as ed
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    model = ed.AutoEasyDeLModelForCausalLM.from_pretrained(
        str(a.folder), dtype=jnp.float32, param_dtype=jnp.float32, precision=jax.lax.Precision.DEFAULT,
        auto_shard_model=False)
    vocab = model.config.vocab_size
    log(f"loaded in {time.perf_counter() - t0:.1f} s; attention {getattr(model.config, 'attn_mechanism', '?')}")
    graphdef, state = nnx.split(model)
    rs = np.random.RandomState(a.seed)
    out = []
    with model.mesh:
        for b in a.batches:
            prompts = jnp.asarray(rs.randint(3, vocab, (b, a.prompt_len)), jnp.int32)

            def generate(k, prompts=prompts):
                config = GenerationConfig(max_new_tokens=k, do_sample=False, eos_token_id=vocab, pad_token_id=0)

                @jax.jit
                def gen(state, ids):
                    return nnx.merge(graphdef, state).generate(ids, generation_config=config).sequences
                return lambda: gen(state, prompts)
            out.append(ref_venv.time_decode(b, a.prompt_len, a.new, a.repeats, generate, a.return_tokens, log))
    return {"mode": "decode", "prompt_len": a.prompt_len, "new": a.new, "seed": a.seed, "repeats": a.repeats,
            "attention": str(getattr(model.config, "attn_mechanism", "?")), "results": out}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("decode",))
    p.add_argument("folder", type=Path, help="HF folder: config.json + model.safetensors")
    p.add_argument("--seed", type=int, default=0, help="prompts")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="median of this many calls")
    p.add_argument("--return-tokens", action="store_true", help="include the generated tokens")
    a = p.parse_args(argv)
    if not (a.folder / "config.json").is_file():
        raise SystemExit(f"{a.folder}: no config.json (expected a Hugging Face folder)")
    res = run_decode(a)
    import easydel
    import flax
    import jax
    res.update({"impl": "EasyDeL (jit)", "easydel": easydel.__version__, "flax": flax.__version__,
                "jax": jax.__version__, "backend": jax.default_backend(), "cpus": os.cpu_count()})
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

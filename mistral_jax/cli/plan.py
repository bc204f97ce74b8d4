"""Memory plan of a training layout, e.g. `python -m train.plan --preset mistral-7b-v0.1 --mesh
data=1,fsdp=8,tensor=1 --seq-len 4096 --batch 8 --remat full --device-memory h100`.

Prints per-device bytes of params, optimizer state, gradients and the batch (exact, from the shardings) and
the compiled train step's XLA memory analysis (arguments, temporaries: activations and gradients live
there), then whether it fits the given per-device memory. The step is compiled for the CPU backend on
simulated devices, so its temporaries are the CPU compiler's; TPU and GPU compilers schedule differently.
Exit status: 0 planned (whether or not it fits), 2 bad arguments, 3 out of host memory while planning (one line
naming the stage, the bytes requested and available, and what to change).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

from mistral_jax.runtime import oom
from mistral_jax.runtime.arg_types import int_in

# jax and the library are imported inside the functions, for start-up time: --help and bad flags answer at
# once, and the plan sets XLA_FLAGS (simulated devices) before jax starts its backend.


def _mesh(text: str) -> tuple[int, int, int]:
    """--mesh: the mesh syntax of every program (`sharding.parse_mesh`: 1,8,1 or data=1,fsdp=8,tensor=1),
    explicit sizes only (no -1: the plan simulates exactly that many devices)."""
    from mistral_jax.model.sharding import parse_mesh   # imports jax, but starts no backend (XLA_FLAGS still apply)
    try:
        return parse_mesh(text, allow_rest=False)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


PROG = "python -m train.plan"
# --help's description: the docstring's first paragraph (one sentence with a complete example command)
DESCRIPTION = " ".join(__doc__.split("\n\n")[0].split())


def parse_args(argv: Sequence[str] | None, prog: str = PROG) -> argparse.Namespace:
    """Parsed and checked flags (argparse exits with status 2 and a one-line error for a bad value or a
    layout the plan cannot simulate: see `memory_plan.check_layout`)."""
    from mistral_jax.training.memory_plan import MAX_SIMULATED_DEVICES, check_layout   # starts no jax backend
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                epilog="exit status: 0 planned (whether or not it fits), 2 bad arguments, 3 out of "
                                       "host memory while planning (one line; try --no-compile)")
    p.add_argument("--preset", default="mistral-7b-v0.1", help="model preset (mistral_jax/model/presets/NAME.json)")
    p.add_argument("--mesh", type=_mesh, required=True, metavar="D,F,T",
                   help="device mesh as data,fsdp,tensor (e.g. 1,8,1) or data=D,fsdp=F,tensor=T (omitted axes "
                        "are 1), the same syntax as the infer programs' --mesh; at most "
                        f"{MAX_SIMULATED_DEVICES} (simulated) devices")
    p.add_argument("--seq-len", type=int_in(1), required=True)
    p.add_argument("--batch", type=int_in(1), required=True,
                   help="global rows per step (a multiple of grad_accum x data x fsdp)")
    p.add_argument("--grad-accum", type=int_in(1), default=1)
    p.add_argument("--remat", default="full", choices=("none", "full", "dots"))
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--lora-rank", type=int_in(0), default=0)
    p.add_argument("--device-memory", default="h100", help="v5e, v5p, h100, h200, v4 or a size such as 16GiB")
    p.add_argument("--no-compile", action="store_true", help="state bytes only (no XLA memory analysis)")
    args = p.parse_args(argv)
    try:   # pure arithmetic, before any device exists
        check_layout(args.mesh, args.seq_len, args.batch, args.grad_accum, args.lora_rank)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Prints the plan; exit status 0 planned (whether or not it fits), 2 bad arguments, 3 out of memory."""
    args = parse_args(argv, prog)
    advice = (["--no-compile (state bytes only, no XLA memory analysis)"] if not args.no_compile else []) + \
        ["more free host memory"]
    with oom.Reporter(prog, advice).stage(
            "compiling the train step for its memory analysis" if not args.no_compile else "planning"):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    n = math.prod(args.mesh)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:   # before jax starts its backend
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        if not os.environ.get("JAX_PLATFORMS"):
            import jax   # imported (by the --mesh parser) but not started: the platform can still be chosen
            jax.config.update("jax_platforms", "cpu")
    from mistral_jax.training import memory_plan as mp
    from mistral_jax.model.config import ModelConfig
    from mistral_jax.runtime.dtypes import parse_dtype
    try:
        limit = mp.parse_memory(args.device_memory)
        cfg = ModelConfig.preset(args.preset).replace(max_seq_len=args.seq_len)
        pl = mp.plan(cfg, args.mesh, args.seq_len, args.batch, remat=args.remat,
                     dtype=parse_dtype(args.dtype, "--dtype"),
                     param_dtype=parse_dtype(args.param_dtype, "--param-dtype"),
                     grad_accum=args.grad_accum, lora_rank=args.lora_rank, compile=not args.no_compile)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = lambda b: f"{b / mp.GiB:8.2f} GiB"  # noqa: E731
    d, f, t = args.mesh
    print(f"{args.preset}: {pl.n_params:,} params ({pl.n_trained:,} trained), mesh data={d} fsdp={f} tensor={t}, "
          f"batch {args.batch} x {args.seq_len}, grad_accum {args.grad_accum}, remat {args.remat}, compute "
          f"{args.dtype}, params {args.param_dtype}")
    print(f"  params      {g(pl.params)}   (per device, exact)")
    print(f"  opt state   {g(pl.opt_state)}")
    print(f"  gradients   {g(pl.grads)}")
    print(f"  batch       {g(pl.batch)}")
    if pl.compiled:
        c = pl.compiled
        print(f"  compiled step (CPU backend): arguments {g(c['argument'])}, temporaries {g(c['temp'])}, "
              f"outputs {g(c['output'])} ({g(c['alias'])} aliased to donated arguments)")
    total = pl.total()
    verdict = "fits" if total <= limit else "does NOT fit"
    if not pl.compiled and total <= limit:
        verdict = "state fits (activations not counted without compiling)"
    print(f"  total       {g(total)}   vs {g(limit)} per device ({args.device_memory}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

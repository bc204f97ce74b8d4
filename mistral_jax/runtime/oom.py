"""Out of memory, reported on one line: the programs' stages end an out-of-memory failure (host or device;
loading, compiling or running) with

    <program>: out of memory while <stage>: requested X GiB, Y GiB available <where>; try <advice>

on stderr and exit status `EXIT_CODE`, never a traceback (MISTRAL_JAX_DEBUG=1 re-raises for one).

Recognised: numpy's MemoryError ("Unable to allocate 13.5 GiB for an array ..."), XLA's runtime errors
(`jax.errors.JaxRuntimeError` / `XlaRuntimeError`: "RESOURCE_EXHAUSTED: Out of memory allocating N bytes",
"Failed to allocate request for 4.00GiB (4294967296B)", TPU's "Ran out of memory in memory space hbm. Used
20.5G of 15.48G hbm", "Attempting to allocate 8.00G. That was not possible. There are 5.59G free."), also when
wrapped by another exception (as __cause__ or __context__, or quoted in its message, as orbax and the
checkpoint loader do).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Any, Callable, Iterator, Mapping, NoReturn, Sequence

EXIT_CODE = 3

# Error types whose message decides (XLA's); any message of these that says out-of-memory counts.
_XLA_TYPES = ("JaxRuntimeError", "XlaRuntimeError")
_XLA_OOM = re.compile(r"RESOURCE_EXHAUSTED|out of memory|CUDA_ERROR_OUT_OF_MEMORY|failed to allocate|"
                      r"unable to allocate|ran out of memory|that was not possible", re.I)
# In the message of any other (wrapping) exception only unmistakable phrases count.
_QUOTED_OOM = re.compile(r"RESOURCE_EXHAUSTED[^\n]*(memory|allocat)|out of memory (while trying to )?allocating|"
                         r"CUDA_ERROR_OUT_OF_MEMORY|Unable to allocate [^\n]* for an array|"
                         r"Ran out of memory in memory space", re.I)

_UNITS = {"": 1, "B": 1, "BYTES": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50, "E": 2**60}
_SIZE = r"([\d.]+)\s*((?:[KMGTPE]i?B?)|B|bytes)\b"
_REQUESTED = [re.compile(p, re.I) for p in (
    r"\((\d+)B\)",                                        # "request for 4.00GiB (4294967296B)"
    r"allocat\w*\s+(\d+)\s+bytes",                         # "Out of memory allocating N bytes", "to allocate N bytes"
    r"Used\s+" + _SIZE + r"\s+of\s+",                      # TPU: "Used 20.5G of 15.48G hbm"
    r"allocat\w*\s+(?:request\s+for\s+)?" + _SIZE,         # "Unable to allocate 13.5 GiB", "allocate 8.00G."
)]
_AVAILABLE = [re.compile(p, re.I) for p in (
    r"There (?:are|is)\s+" + _SIZE + r"\s+free",           # "There are 5.59G free."
    r"Used\s+[\d.]+\s*[KMGTPE]?i?B?\s+of\s+" + _SIZE,     # TPU: the capacity
)]


def _to_bytes(number: str, unit: str = "") -> int | None:
    u = unit.upper().replace("IB", "").rstrip("B") if unit.upper() != "BYTES" else "BYTES"
    try:
        return int(float(number) * _UNITS[u])
    except (KeyError, ValueError):
        return None


def _chain(e: BaseException) -> Iterator[BaseException]:
    """`e` and every exception it wraps: __cause__, __context__ (also when suppressed by `from None`) and
    an exception group's members; outermost first, each once."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen or len(seen) > 64:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]


def _text(x: BaseException) -> str:
    try:
        return str(x)
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails
        return type(x).__name__


def _is_xla(x: BaseException) -> bool:
    return any(t.__name__ in _XLA_TYPES for t in type(x).__mro__)


def find(e: BaseException) -> BaseException | None:
    """The out-of-memory error `e` is or wraps (the innermost such one), else None."""
    hits = [x for x in _chain(e) if isinstance(x, MemoryError) or (_is_xla(x) and _XLA_OOM.search(_text(x)))
            or (not isinstance(x, (SystemExit, KeyboardInterrupt)) and _QUOTED_OOM.search(_text(x)))]
    return hits[-1] if hits else None


def is_oom(e: BaseException) -> bool:
    """Whether `e` is, wraps or quotes an out-of-memory failure (host or device)."""
    return find(e) is not None


def requested_bytes(e: BaseException) -> int | None:
    """The size of the allocation that failed, from numpy's MemoryError or the error messages."""
    for x in reversed(list(_chain(e))):
        size = getattr(x, "_total_size", None)                # numpy's _ArrayMemoryError
        if isinstance(size, int):
            return size
        for pat in _REQUESTED:
            m = pat.search(_text(x))
            if m:
                n = _to_bytes(*m.groups())
                if n is not None:
                    return n
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text)
    except (OSError, ValueError):
        return None


def host_available() -> int | None:
    """Bytes this process may still allocate on the host: the smallest of MemAvailable (/proc/meminfo, or
    sysconf's available pages), the cgroup's memory limit less its usage, and RLIMIT_AS less the process's
    address space."""
    vals: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            vals += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            vals.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    cgroup = ""
    with contextlib.suppress(OSError):
        with open("/proc/self/cgroup") as f:
            cgroup = next((line.strip().split(":", 2)[2] for line in f if line.startswith("0::")), "")
    for limit_file, usage_file in ((f"/sys/fs/cgroup{cgroup}/memory.max", f"/sys/fs/cgroup{cgroup}/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            vals.append(max(limit - usage, 0))
            break
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource   # imported here: POSIX only (no RLIMIT_AS figure elsewhere)
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            vals.append(max(soft - vm, 0))
    return min(vals) if vals else None


def available(e: BaseException) -> tuple[int | None, str]:
    """(bytes free where the allocation failed, where): host memory for numpy's MemoryError and XLA on CPU;
    the least free memory_stats() of the local accelerators (or the error's own figure) otherwise."""
    err = find(e) or e
    jax = sys.modules.get("jax")
    if isinstance(err, MemoryError) or jax is None:
        return host_available(), "in host memory"
    try:
        devices = jax.local_devices()
    except Exception:  # noqa: BLE001 - no backend: say nothing about devices
        devices = []
    if not devices or devices[0].platform == "cpu":
        return host_available(), "in host memory"
    m = re.search(r"device ordinal (\d+)", _text(err))
    if m:
        devices = [d for d in devices if d.id == int(m.group(1))] or devices
    best: tuple[int, str] | None = None
    for d in devices:
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 - a backend without memory statistics
            continue
        if "bytes_limit" in stats:
            free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
            if best is None or free < best[0]:
                best = (free, f"on {d.platform}:{d.id}")
    if best is not None:
        return best
    for x in _chain(e):
        for pat in _AVAILABLE:
            m = pat.search(_text(x))
            if m:
                return _to_bytes(*m.groups()), f"on {devices[0].platform}"
    return None, f"on {devices[0].platform}"


def compiling(e: BaseException) -> bool:
    """Whether the failure happened while XLA compiled a program: the message says so (TPU's "compile
    permanent error"), or a frame of jax's compiler is on the stack (kept unless jax filtered it out)."""
    if re.search(r"\bcompil", _text(find(e) or e), re.I):
        return True
    for x in _chain(e):
        tb = x.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.replace(os.sep, "/").endswith("jax/_src/compiler.py"):
                return True
            tb = tb.tb_next
    return False


def frame_stage(e: BaseException, stages: Mapping[str, str | Callable[[Mapping[str, Any]], str]],
                default: str) -> str:
    """The stage named by the innermost frame of the failure whose "module:function" is a key of `stages`
    (a name, or a function of that frame's local variables giving one), else `default`."""
    frames = []
    for x in _chain(e):
        tb = x.__traceback__
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
    for frame in reversed(frames):
        stage = stages.get(f"{frame.f_globals.get('__name__')}:{frame.f_code.co_name}")
        if stage is not None:
            try:
                return stage if isinstance(stage, str) else stage(frame.f_locals)
            except Exception:  # noqa: BLE001 - a missing local: the next frame out may still say
                continue
    return default


def gib(n: int) -> str:
    """A byte count in binary units: '512.00 MiB', '54.32 GiB'."""
    for unit, size in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def message(program: str, stage: str, e: BaseException, advice: Sequence[str] = ()) -> str:
    """`<program>: out of memory while <stage>: requested X, Y available <where>; try <advice>` (the figures
    that are known; "(compiling)" when XLA ran out while compiling)."""
    if compiling(e) and "compil" not in stage:
        stage = f"{stage} (compiling)"
    elif any("Error dispatching computation" in _text(x) for x in _chain(e)):
        stage = f"{stage} (or a computation before it)"   # an input's failed allocation reported by its reader
    figures = []
    req = requested_bytes(e)
    if req is not None:
        figures.append(f"requested {gib(req)}")
    free, where = available(e)
    if free is not None:
        figures.append(f"{gib(free)} available {where}")
    line = f"{program}: out of memory while {stage}"
    if figures:
        line += ": " + ", ".join(figures)
    advice = [a for a in advice if a]
    if advice:
        line += "; try " + (advice[0] if len(advice) == 1 else ", ".join(advice[:-1]) + " or " + advice[-1])
    return _one_line(line)


def _close_progress_bars() -> None:
    """Ends the lines of live tqdm bars, so that the report starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        with contextlib.suppress(Exception):
            bar.close()


class Reporter:
    """One program's out-of-memory report: `with reporter.stage("loading the checkpoint"): ...` turns an
    out-of-memory failure inside into the one-line report on stderr and SystemExit(EXIT_CODE); other
    exceptions pass. `advice` (a list, or a function of the stage name giving one) says what to change."""

    def __init__(self, program: str, advice: Sequence[str] | Callable[[str], Sequence[str]] = ()):
        self.program, self.advice = program, advice

    def report(self, e: BaseException, stage: str, advice: Sequence[str] | None = None) -> NoReturn:
        """Prints the one line for `e` at `stage` and exits with EXIT_CODE (the line without figures or
        advice should finding them fail: never a traceback here)."""
        try:
            if advice is None:
                advice = self.advice(stage) if callable(self.advice) else self.advice
            line = message(self.program, stage, e, advice)
        except Exception:  # noqa: BLE001 - e.g. a backend that fails when asked about its devices
            line = _one_line(f"{self.program}: out of memory while {stage}")
        _close_progress_bars()
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODE)

    @contextlib.contextmanager
    def stage(self, name: str | Callable[[BaseException], str],
              advice: Sequence[str] | None = None) -> Iterator[None]:
        """`name`: the stage, or a function of the exception giving it (e.g. `frame_stage`)."""
        try:
            yield
        except Exception as e:
            if not is_oom(e) or os.environ.get("MISTRAL_JAX_DEBUG"):
                raise
            self.report(e, name if isinstance(name, str) else name(e), advice)

"""The package as a whole: its import graph (no cycles, lower layers never import higher ones), module and
function sizes, the public names of `mistral_jax`, the `mistral-jax` console script, and the wheel (only
`mistral_jax`, with its package data, working from outside the checkout)."""

from __future__ import annotations

import ast
import configparser
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import mistral_jax
from mistral_jax import errors
from mistral_jax.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mistral_jax"
# Lower layers never import higher ones. data sits below checkpoint: a Hugging Face or mistral-inference
# export ships the tokenizer mistral-common holds for the model's vocab (data.tokenizer.default_tokenizer_path).
LAYERS = ("errors", "runtime", "model", "data", "checkpoint", "inference", "evaluation", "training", "cli")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Dotted module name -> file of every module under mistral_jax/ (a package by its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of this package: line of the first such import}, from every import
    statement of the module's syntax tree (inside functions and `if TYPE_CHECKING:` blocks included)."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:      # a name imported from a module: that module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycles():
    graph = _import_graph()
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_lower_layers_never_import_higher_ones():
    def layer(module: str) -> int | None:
        parts = module.split(".")
        return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None

    graph = _import_graph()
    violations = [f"{a} imports {b} (line {line})" for a, edges in sorted(graph.items())
                  for b, line in sorted(edges.items())
                  if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert not violations, f"layer order {' < '.join(LAYERS)} broken:\n" + "\n".join(violations)


def test_module_and_function_sizes():
    offenders = []
    for name, path in _modules().items():
        text = path.read_text()
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            offenders.append(f"{path.relative_to(ROOT)}: {n} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines "
                                     f"(at most {MAX_FUNCTION_LINES})")
    assert not offenders, "too large:\n" + "\n".join(offenders)


def test_public_names_resolve():
    for name in mistral_jax.__all__:
        assert getattr(mistral_jax, name) is not None, name
    defined = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)
               and v.__module__ == errors.__name__}
    missing = sorted(defined - set(mistral_jax.__all__))
    assert not missing, f"error types missing from mistral_jax.__all__: {missing}"
    assert mistral_jax.ModelConfig.preset("tiny").n_layers > 0
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mistral_jax.nope


def test_light_modules_do_not_import_jax():
    code = "import sys, mistral_jax, mistral_jax.runtime.files, mistral_jax.cli.main; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_console_script_help_and_unknown_subcommand(capsys):
    assert cli_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mistral-jax SUBCOMMAND")
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(cli_main.COMMANDS)
    assert cli_main.main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown subcommand 'bogus'" in err


@pytest.mark.parametrize("command", list(cli_main.COMMANDS))
def test_subcommand_help_names_the_console_script(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main.main([command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mistral-jax {command} ")


def _checkout_copy(dst: Path) -> None:
    """The files git would commit (tracked, and untracked but not ignored), copied to dst: a build there
    cannot pick up stale build/ folders or ignored files of the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    """The package's wheel, built from a copy of the checkout and unzipped."""
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, unzipped = tmp / "src", tmp / "dist", tmp / "unzipped"
    _checkout_copy(src)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True)
    (wheel,) = dist.glob("mistral_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unzipped)
    return unzipped


def test_wheel_holds_only_the_package_and_its_data(wheel_dir):
    top = {p.name for p in wheel_dir.iterdir() if not p.name.endswith(".dist-info")}
    assert top == {"mistral_jax"}
    for pattern in ("model/presets/*.json", "evaluation/prompt_presets/*.txt", "evaluation/tasks/*.yaml",
                    "evaluation/tasks/*.jsonl"):
        want = sorted(p.relative_to(PACKAGE) for p in PACKAGE.glob(pattern))
        got = sorted(p.relative_to(wheel_dir / "mistral_jax") for p in (wheel_dir / "mistral_jax").glob(pattern))
        assert want and got == want, f"{pattern}: the checkout has {want}, the wheel {got}"


def test_wheel_works_outside_the_checkout(wheel_dir, tmp_path):
    entry_points = configparser.ConfigParser()
    (info,) = wheel_dir.glob("*.dist-info")
    entry_points.read(info / "entry_points.txt")
    assert dict(entry_points["console_scripts"]) == {"mistral-jax": "mistral_jax.cli.main:main"}
    script = textwrap.dedent(f"""
        import importlib, sys
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        import mistral_jax
        assert mistral_jax.__file__.startswith({str(wheel_dir)!r}), mistral_jax.__file__
        from mistral_jax.model.config import ModelConfig
        assert ModelConfig.preset("tiny").vocab_size > 0
        from mistral_jax.data.tokenizer import Tokenizer
        from mistral_jax.evaluation.prompts import system_prompt
        guardrail = system_prompt(None, safe=True)           # what --safe-prompt puts before the dialogue
        tok = Tokenizer()
        ids = tok.encode_chat([{{"role": "system", "content": guardrail}}, {{"role": "user", "content": "Hi"}}])
        assert guardrail.split(".")[0] in tok.decode(ids), tok.decode(ids)
        module, _, attr = {entry_points["console_scripts"]["mistral-jax"]!r}.partition(":")
        sys.argv = ["mistral-jax", "--help"]
        status = getattr(importlib.import_module(module), attr)()
        outside = [m.__file__ for n, m in sys.modules.items()
                   if n.startswith("mistral_jax") and not m.__file__.startswith({str(wheel_dir)!r})]
        assert not outside, outside
        sys.exit(status)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(wheel_dir),
                                                                         "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: mistral-jax SUBCOMMAND")

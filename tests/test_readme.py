"""The README's Python example runs as written against the public API (on the tiny preset, saved where the
example reads its checkpoint)."""

import re
from pathlib import Path

import jax
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow   # one of the everyday subset's longest (issue 20, point 7)
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    import mistral_jax as mj

    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "mistral-7b-v0.1" in code and "ckpt/mistral-7b" in code
    cfg = mj.ModelConfig.preset("tiny")
    mj.save_params(tmp_path / "ckpt" / "mistral-7b", cfg, mj.init_params(cfg, jax.random.key(1)))
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"mistral-7b-v0.1"', '"tiny"').replace(", 32, mesh=mesh)", ", 4, mesh=mesh)"),
                 str(README), "exec"), {})
    assert capsys.readouterr().out.strip()            # the decoded completion

"""Where a training run's weights start besides a local folder: a Hugging Face Hub id for --init-from
(offline, from a hand-built huggingface_hub cache), and a PEFT adapter folder for lora.init_from; and the PEFT
adapter a LoRA run exports beside its merged export. Runs: one LoRA run (base from the Hub id, exported), a
LoRA run starting from its adapter and a full run starting from the merged weights (via another Hub id)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from mistral_jax.checkpoint import peft
from mistral_jax.checkpoint.native import load_params
from mistral_jax.checkpoint.torch_write import write_hf
from mistral_jax.cli import finetune
from mistral_jax.model import transformer as model_lib
from mistral_jax.model.config import ModelConfig

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hf_constants  # noqa: E402

from tests.checkpoint.test_hub import make_hub_cache  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "finetune-tiny.toml"
CFG = ModelConfig.preset("tiny")
COMMIT = "3" * 40
QUICK = {"mesh.devices": 2, "mesh.fsdp": 2, "eval.answers": 0, "checkpoint.every": 100}


def _argv(run_dir: Path, *extra: str, **sets) -> list[str]:
    argv = ["--config", str(TINY), "--run-dir", str(run_dir)]
    for k, v in {**QUICK, **sets}.items():
        argv += ["--set", f"{k}={v}"]
    return argv + list(extra)


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [x for x in err.splitlines() if x.startswith("error:")]


def _to_hub(cache: Path, repo: str, folder: Path) -> None:
    make_hub_cache(cache, repo, {COMMIT: folder}, {"main": COMMIT})


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """huggingface_hub offline with an empty cache folder (module-wide), and a local HF base folder."""
    root = tmp_path_factory.mktemp("init_sources")
    cache = root / "hub"
    cache.mkdir()
    base = write_hf(root / "base", CFG, model_lib.init_params(CFG, jax.random.key(5)), tokenizer=None,
                    progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        _to_hub(cache, "org/base", base)
        yield cache, base


@pytest.fixture(scope="module")
def lora_run(hub, tmp_path_factory):
    """A LoRA run (rank 4, 3 steps) on the base named by its Hub id, exported."""
    run_dir = tmp_path_factory.mktemp("init_sources") / "lora"
    argv = _argv(run_dir, "--init-from", "org/base", **{"lora.rank": 4, "train.steps": 3, "eval.before": "false"})
    assert finetune.main(argv) == 0
    return run_dir


@pytest.mark.slow
def test_lora_export_writes_a_peft_adapter_that_merges_to_the_export(lora_run, hub):
    summary = json.loads((lora_run / "summary.json").read_text())
    adapter = lora_run / "adapter"
    assert summary["adapter"] == str(adapter)
    assert sorted(p.name for p in adapter.iterdir()) == [peft.CONFIG_FILE, peft.WEIGHTS_FILE]
    assert json.loads((adapter / peft.CONFIG_FILE).read_text())["base_model_name_or_path"] == "org/base"
    assert summary["lora_base"]["hub_id"] == "org/base"
    _, base = load_params(hub[1])
    _, merged = load_params(lora_run / "export")
    got = peft.merge_peft_adapter(base, CFG, adapter)
    flat_got, flat_want = jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves_with_path(merged)
    assert [k for k, _ in flat_got] == [k for k, _ in flat_want]
    for (k, x), (_, y) in zip(flat_got, flat_want):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7, err_msg=str(k))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))          # the adapters changed the weights
               for x, y in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(merged)))


@pytest.mark.slow
def test_runs_start_from_the_adapter_and_from_a_hub_id(lora_run, hub, tmp_path, capsys):
    cache, base = hub
    _, merged = load_params(lora_run / "export")
    _to_hub(cache, "org/merged", write_hf(tmp_path / "merged", CFG, merged, tokenizer=None, progress=False))
    before = {"train.steps": 1, "eval.before": "true", "eval.export": "false"}
    # the adapter on the local base, and the merged weights by Hub id: the same model before training
    assert finetune.main(_argv(tmp_path / "from_adapter", "--init-from", str(base), **before,
                               **{"lora.init_from": lora_run / "adapter"})) == 0
    out = capsys.readouterr().out
    assert f"LoRA adapters from {lora_run / 'adapter'} (LoRA r=4 lora_alpha=16 on q_proj" in out
    assert finetune.main(_argv(tmp_path / "from_hub", "--init-from", "org/merged", **before)) == 0
    assert f"initial params from org/merged ({cache / 'models--org--merged' / 'snapshots' / COMMIT})" \
        in capsys.readouterr().out
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("from_adapter", "from_hub"))
    assert a["before_heldout_tokens"] == b["before_heldout_tokens"]
    assert a["before_heldout_loss"] == pytest.approx(b["before_heldout_loss"], rel=1e-5)
    # a run that starts from fresh adapters (B = 0) is the base's loss, not this one
    assert "lora_base" in a and "lora_base" not in b


@pytest.mark.slow   # one of the everyday subset's longest (issue 20, point 7)
def test_adapter_rank_mismatch_is_one_line(lora_run, tmp_path, capsys):
    capsys.readouterr()
    argv = _argv(tmp_path / "x", "--init-from", "org/base", **{"lora.init_from": lora_run / "adapter", "lora.rank": 8})
    assert finetune.main(argv) == 1
    assert _errors(capsys) == [f"error: lora.init_from {lora_run / 'adapter' / peft.CONFIG_FILE}: field 'r' is 4 "
                               "but the run sets lora.rank = 8"]


def test_unknown_hub_id_offline_is_one_line(hub, tmp_path, capsys):
    assert finetune.main(_argv(tmp_path / "x", "--init-from", "org/absent")) == 1
    assert _errors(capsys) == [f"error: --init-from org/absent: no such folder, and the Hugging Face Hub model "
                               f"org/absent (revision main) is not in the cache {hub[0]} (HF_HUB_OFFLINE is set)"]

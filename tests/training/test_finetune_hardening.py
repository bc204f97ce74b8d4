"""Hostile fine-tuning (and pretraining) inputs of issue 17: a file both trained on and held out under two
spellings, infinite or absurd config values, non-finite params after an update, deeply nested JSON, files
with no usable conversation, and tool calls. Each is a one-line error or a counted skip, never a traceback."""

import json
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from mistral_jax.data.chat_files import REASONS, expand_paths, overlap_message, read_chat_data
from mistral_jax.data.chat_stream import ChatStream
from mistral_jax.data.chat_template import encode_prompt
from mistral_jax.errors import ChatDataError, ChatFormatError
from mistral_jax.training import chat_source
from mistral_jax.data import text as data_lib
from mistral_jax.model import lora as lora_lib
from mistral_jax.training import optim
from mistral_jax.model import sharding
from mistral_jax.training import run_config as rc_lib
from mistral_jax.training import train_step as ts
from mistral_jax.model.config import ModelConfig
from mistral_jax.training.run_config import DataSection
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.training.step_loop import diverged_message
from tests.packed import two_documents
from mistral_jax.cli import finetune

REPO = Path(__file__).resolve().parents[2]
FT_TINY = REPO / "configs" / "finetune-tiny.toml"
PT_TINY = REPO / "configs" / "pretrain-tiny.toml"
GOOD = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        for i in range(6)]
DEEP = "[" * 100_000


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [x for x in err.splitlines() if x.startswith("error:")]


def _finetune(run_dir: Path, *sets: str) -> int:
    argv = ["--config", str(FT_TINY), "--run-dir", str(run_dir), "--set", "mesh.devices=1", "--set", "mesh.fsdp=1"]
    for s in sets:
        argv += ["--set", s]
    return finetune.main(argv)


# ----- 7: the same file as training and held-out data, spelled two ways -----

def test_a_file_named_twice_is_one_file_and_cannot_be_held_out_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.jsonl").write_text("\n".join(GOOD) + "\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "good.jsonl")
    absolute = str(tmp_path / "good.jsonl")
    assert expand_paths(["good.jsonl", absolute, "link.jsonl", "*.jsonl"]) == [Path("good.jsonl")]
    for val in (absolute, "link.jsonl"):
        assert overlap_message(expand_paths(["good.jsonl"]), expand_paths([val])) == (
            f"good.jsonl is both a training and a held-out file (named {val} among the held-out files); "
            "a conversation cannot be trained on and held out")
    # the training program: a config error (exit 2), one line naming both fields and the file
    assert _finetune(tmp_path / "run", "data.source=chat", 'data.paths=["good.jsonl"]',
                     f'data.val_paths=["{absolute}"]') == 2
    errors = _errors(capsys)
    assert errors == [f"error: [data] fields 'paths' and 'val_paths': good.jsonl is both a training and a held-out "
                      f"file (named {absolute} among the held-out files); a conversation cannot be trained on and "
                      "held out"], errors


def test_pretraining_lists_a_file_named_twice_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    for name in ("a", "b"):
        (tmp_path / "d" / f"{name}.txt").write_text(f"text of {name}\n")
    (tmp_path / "d" / "z_link.txt").symlink_to(tmp_path / "d" / "a.txt")   # another name, so another hash
    corpus = data_lib.list_files(DataSection(source="files", paths=("d/*.txt", str(tmp_path / "d" / "*.txt"))))
    assert [str(f) for f in corpus.files] == [str(tmp_path / "d" / "a.txt"), str(tmp_path / "d" / "b.txt")]
    assert corpus.n_duplicates == 4 and "4 duplicate name(s) of a listed file, read once" in corpus.describe(0)


# ----- 8 and 15: every float finite, LoRA fields checked against the model -----

@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", "[optim] field 'lr': Input should be a finite number (got inf)"),
    ("optim.weight_decay=inf", "[optim] field 'weight_decay': Input should be a finite number (got inf)"),
    ("optim.eps=nan", "[optim] field 'eps': Input should be a finite number (got nan)"),
    ("optim.clip_norm=inf", "[optim] field 'clip_norm': Input should be a finite number"),
    ("data.val_percent=nan", "[data] field 'val_percent': Input should be a finite number"),
    ("train.peak_flops=inf", "[train] field 'peak_flops': Input should be a finite number"),
    ("eval.sample_temperature=inf", "[eval] field 'sample_temperature': Input should be a finite number"),
    ("lora.alpha=inf", "[lora] field 'alpha': Input should be a finite number (got inf)"),
    ("model.overrides.rope_theta=inf", "[model]: model config field 'rope_theta' must be a number > 1"),
    ('lora.targets=["wq","wq"]', "[lora] field 'targets': ['wq', 'wq'] must be a non-empty subset of "
                                 "['wq', 'wk', 'wv', 'wo', 'w1', 'w2', 'w3'] without repeats (repeated: wq)"),
    ("lora.rank=1000000000", "[lora] field 'rank': 1000000000 exceeds 32, the smaller dimension of the targeted "
                             "projection wk (64 x 32 in this model)"),
    ("lora.rank=33", "[lora] field 'rank': 33 exceeds 32"),
])
def test_non_finite_and_lora_values_are_one_line_config_errors(override, message):
    with pytest.raises(rc_lib.RunConfigError) as e:
        rc_lib.load(PT_TINY, [override])
    assert str(e.value).startswith(f"{PT_TINY}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_lora_rank_limit_follows_the_targets_and_the_model():
    rc = rc_lib.load(PT_TINY, ["lora.rank=64", 'lora.targets=["wq", "wo", "w1"]'])   # 64 x 64, 64 x 128: fits
    assert rc.lora.rank == 64
    with pytest.raises(rc_lib.RunConfigError, match=r"\[lora\] field 'rank': 65 exceeds 64, .* projection wq "):
        rc_lib.load(PT_TINY, ["lora.rank=65", 'lora.targets=["wq", "w1"]'])
    # the library refuses it too, before allocating any adapter
    with pytest.raises(ValueError, match="lora.add_adapters: field 'rank': 33 exceeds 32"):
        lora_lib.check_rank(ModelConfig.preset("tiny"), lora_lib.LoraConfig(rank=33), "lora.add_adapters")


def test_finetune_program_refuses_inf_lr_and_huge_rank_with_exit_2(tmp_path, capsys):
    for override, text in (("optim.lr=inf", "[optim] field 'lr': Input should be a finite number (got inf)"),
                           ("lora.rank=1000000000", "[lora] field 'rank': 1000000000 exceeds 32")):
        assert _finetune(tmp_path / "run", override) == 2
        errors = _errors(capsys)
        assert len(errors) == 1 and text in errors[0], errors
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_an_update_to_non_finite_params_is_not_applied():
    """lr=1e39 is a finite float64 but infinite in float32: the loss and gradients at the step are finite,
    the params it would make are not. The step keeps the old state and reports finite=False."""
    cfg = ModelConfig.preset("tiny")
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    o = rc_lib.OptimSection(lr=1e39, warmup_steps=0)
    opt = optim.make_optimizer(o, 10)
    step = ts.make_train_step(cfg, opt, optim.learning_rate_schedule(o, 10), mesh)
    state = ts.init_state(cfg, opt, jax.random.key(0), mesh)
    before = jax.device_get(state)
    state, m = step(state, ts.put_batch(two_documents(2, 16, 5, 32000, 0), mesh, 1))
    m = jax.device_get(m)
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and not bool(m["finite"])
    after = jax.device_get(state)
    for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before)):
        assert np.array_equal(a, b)                    # step, params and optimizer state: all unchanged
    assert ts.all_finite({"a": np.ones(3), "b": {"c": np.zeros(2)}}) and not ts.all_finite({"a": np.array([np.inf])})
    msg = diverged_message(0, m, None, Path("run/checkpoints"))
    assert msg.startswith("non-finite params after the update of step 0 (loss=") and "\n" not in msg
    assert "No checkpoint was written (run/checkpoints)" in msg
    nan = dict(m, loss=np.float32("nan"))
    assert diverged_message(5, nan, 4, Path("c")).startswith("non-finite training loss at step 5 (loss=nan")
    assert "Last good checkpoint: step 4 in c." in diverged_message(5, nan, 4, Path("c"))


# ----- 13, 19: nested JSON and tool calls are counted bad lines -----

def test_deep_nesting_and_tool_calls_are_counted_skips(tmp_path):
    tool = {"messages": [{"role": "user", "content": "weather?"},
                         {"role": "assistant", "content": "Let me look.",
                          "tool_calls": [{"id": "c1", "function": {"name": "weather", "arguments": "{}"}}]},
                         {"role": "user", "content": "so?"}, {"role": "assistant", "content": "sunny"}]}
    null_calls = {"messages": [{"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello", "tool_calls": None}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([GOOD[0], DEEP, json.dumps(tool), json.dumps(null_calls), GOOD[1]]) + "\n")
    data = read_chat_data(path, Tokenizer(), 64)
    rep = data.report
    assert (rep.conversations, rep.skipped) == (3, {"bad_json": 1, "tool_calls": 1})
    assert rep.messages == [f"{path}:2: not valid JSON (nested too deeply to read)",
                            f"{path}:3: messages[1]: a 'assistant' message with 'tool_calls'; tool calls are not "
                            "supported (they would be dropped), so the conversation is skipped"]
    assert set(rep.skipped) <= set(REASONS)
    with pytest.raises(ChatDataError, match=f"^{path}:2: not valid JSON \\(nested too deeply"):
        read_chat_data(path, Tokenizer(), 64, on_error="stop")
    with pytest.raises(ChatFormatError, match="'tool_calls'") as e:
        encode_prompt(tool["messages"][:3], Tokenizer())            # a prompt with tool calls: refused too
    assert e.value.reason == "tool_calls"


def test_pretraining_jsonl_with_deep_nesting_names_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + DEEP + "\n")
    with pytest.raises(data_lib.DataError, match=f"^{path}:2: not valid JSON \\(nested too deeply to read\\)$"):
        data_lib.read_documents([path], Tokenizer())


# ----- 14: no usable conversation: the reasons, and data_report.json -----

@pytest.mark.parametrize("content, counts", [
    ("", "0 non-blank line(s), 0 blank; 0 skipped"),
    ("\n  \n\n", "0 non-blank line(s), 3 blank; 0 skipped"),
    ("{bad\n" + DEEP + "\n" + json.dumps({"prompt": "only"}) + "\n",
     "3 non-blank line(s), 0 blank; 3 skipped (bad_fields: 1, bad_json: 2)"),
], ids=["empty", "blank", "all-bad"])
def test_no_usable_conversation_says_why_and_writes_the_report(tmp_path, content, counts):
    path = tmp_path / "chat.jsonl"
    path.write_text(content)
    rc = rc_lib.load(FT_TINY, ["data.source=chat", f'data.paths=["{path}"]', "eval.answers=0"])
    with pytest.raises(ChatDataError) as e:
        chat_source.make_chat_data(rc, Tokenizer(), tmp_path)
    msg = str(e.value)
    assert msg == (f"chat data: no usable conversations in training file(s) {path}: {counts}; 0 dropped as longer "
                   f"than seq_len=128; first problems in {tmp_path / 'data_report.json'}"), msg
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["train_conversations"] == 0 and report["files"] == [str(path)]
    assert report["n_skipped"] == sum(report["skipped"].values()) and len(report["messages"]) == report["n_skipped"]
    # the library's stream says the same
    with pytest.raises(ChatDataError, match=re.escape(f"chat data: no usable conversations in {path}: {counts};")):
        ChatStream(read_chat_data(path, Tokenizer(), 128), 2)


def test_all_bad_file_in_the_program_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(DEEP + "\n")
    assert _finetune(tmp_path / "run", "data.source=chat", f'data.paths=["{path}"]') == 1
    errors = _errors(capsys)
    assert len(errors) == 1 and errors[0].startswith("error: chat data: no usable conversations in training file(s) "
                                                     f"{path}: 1 non-blank line(s), 0 blank; 1 skipped (bad_json: 1)")
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["skipped"] == {"bad_json": 1}


def test_relative_and_absolute_val_file_are_not_double_counted(tmp_path, monkeypatch):
    """A training file named twice (relative and absolute) is read once; the held-out file is counted apart."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("\n".join(GOOD[:4]) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(GOOD[4:]) + "\n")
    rc = rc_lib.load(FT_TINY, ["data.source=chat", f'data.paths=["train.jsonl", "{tmp_path / "train.jsonl"}"]',
                               f'data.val_paths=["{tmp_path / "val.jsonl"}"]', "eval.answers=0",
                               "data.batch_size=2"])
    source = chat_source.make_chat_data(rc, Tokenizer(), tmp_path)
    assert (source.report["train_conversations"], source.report["heldout_conversations"]) == (4, 2)
    assert source.report["files"] == ["train.jsonl", str(tmp_path / "val.jsonl")]
    assert os.path.exists(tmp_path / "data_report.json")

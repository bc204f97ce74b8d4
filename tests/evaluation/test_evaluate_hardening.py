"""`python -m infer.evaluate` and `python -m infer.lm_eval` against hostile inputs: inputs that are files the run
writes, resume with the data spelled differently or with a replaced checkpoint, corrupt rows in the middle of
examples.jsonl, misleading messages, progress within one long document, and an unwritable lm_eval --output."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from mistral_jax.cli import evaluate as cli  # noqa: E402
from mistral_jax.evaluation.output import EXAMPLES_FILE, RUN_FILE, SUMMARY_FILE  # noqa: E402
from mistral_jax.inference import scoring  # noqa: E402
from mistral_jax.model.config import ModelConfig  # noqa: E402
from tests.evaluation.test_evaluate import TINY, random_params  # noqa: E402

WORDS = Path(json.__file__).read_text().split()


def _save(folder: Path, seed: int) -> Path:
    from mistral_jax.checkpoint.native import save_params

    cfg = ModelConfig(**TINY)
    return save_params(folder, cfg, random_params(cfg, seed))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A native checkpoint of the tiny random model."""
    return _save(tmp_path_factory.mktemp("eval_hard") / "ckpt", 0)


def _docs(path: Path, n: int = 5) -> Path:
    path.write_text("".join(json.dumps({"text": " ".join(WORDS[i * 7:i * 7 + 4 + i])}) + "\n" for i in range(n)))
    return path


def _argv(ckpt: Path, data, out: Path, *extra: str, task: str = "perplexity") -> list[str]:
    data = [data] if isinstance(data, (str, Path)) else data
    return ["--checkpoint", str(ckpt), "--task", task, "--data", *map(str, data), "--output", str(out),
            "--max-length", "64", *extra]


def _rows(out: Path) -> list[str]:
    return (out / EXAMPLES_FILE).read_text().splitlines()


def _summary(out: Path) -> dict:
    return json.loads((out / SUMMARY_FILE).read_text())


def _no_load(monkeypatch):
    """Loading the model fails the test: the refusals below come before it."""
    import mistral_jax.checkpoint.native

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the refusal")
    monkeypatch.setattr(mistral_jax.checkpoint.native, "load_params", boom)


def _one_error_line_of(err: str) -> str:
    """The one error line of a program's stderr (and no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _one_error_line(capsys) -> str:
    return _one_error_line_of(capsys.readouterr().err)


# ----- point 4: an input that is a file the run writes -----

def test_data_that_the_run_writes_is_refused_even_with_overwrite(ckpt, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    out.mkdir()
    data = _docs(out / EXAMPLES_FILE)
    before = data.read_bytes()
    _no_load(monkeypatch)
    for extra in ((), ("--overwrite",)):
        assert cli.main(_argv(ckpt, data, out, *extra)) == 2
        line = _one_error_line(capsys)
        assert f"--data {data}: is {out / EXAMPLES_FILE}, a file this run writes" in line
        assert data.read_bytes() == before
    # the same file under another name (a symbolic link, a hard link), and the other written files
    for name, link in (("alias.jsonl", os.symlink), ("hard.jsonl", os.link)):
        link(data, tmp_path / name)
        assert cli.main(_argv(ckpt, tmp_path / name, out, "--overwrite")) == 2
        assert f"--data {tmp_path / name}: is {out / EXAMPLES_FILE}" in _one_error_line(capsys)
    run_file = _docs(out / RUN_FILE)
    assert cli.main(_argv(ckpt, run_file, out, "--overwrite")) == 2
    assert f"is {out / RUN_FILE}, a file this run writes" in _one_error_line(capsys)
    # the few-shot file, the tokenizer, the moderation prompt and the checkpoint folder count too
    other = _docs(tmp_path / "other.jsonl")
    (out / SUMMARY_FILE).write_text("{}\n")
    assert cli.main(_argv(ckpt, other, out, "--overwrite", "--num-fewshot", "1", "--fewshot-data",
                          str(out / SUMMARY_FILE), task="choice")) == 2
    assert f"--fewshot-data {out / SUMMARY_FILE}: is {out / SUMMARY_FILE}" in _one_error_line(capsys)
    assert cli.main(_argv(ckpt, other, out, "--overwrite", "--moderation-prompt", str(run_file),
                          task="moderate")) == 2
    assert f"--moderation-prompt {run_file}: is" in _one_error_line(capsys)
    assert cli.main(_argv(ckpt, other, ckpt, "--overwrite")) == 2
    assert f"--output {ckpt}: is the --checkpoint folder" in _one_error_line(capsys)
    assert data.read_bytes() == before and run_file.exists()


# ----- point 5: resume with the data spelled differently -----

def test_resume_with_the_data_spelled_differently_scores_nothing_again(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    n = 5
    _docs(tmp_path / "x.jsonl", n)
    out = tmp_path / "out"
    assert cli.main(_argv(ckpt, "x.jsonl", out)) == 0
    first = _rows(out)
    assert sorted(json.loads(r)["key"] for r in first) == [f"{tmp_path / 'x.jsonl'}:{i}" for i in range(1, n + 1)]
    for spelling in (tmp_path / "x.jsonl", "./x.jsonl", "../" + tmp_path.name + "/x.jsonl"):
        assert cli.main(_argv(ckpt, spelling, out)) == 0
        s = _summary(out)
        assert (s["examples"], s["this_run"]["examples"], s["this_run"]["skipped_already_scored"]) == (n, 0, n)
        assert _rows(out) == first
    # the same file twice is refused
    assert cli.main(_argv(ckpt, ["x.jsonl", str(tmp_path / "x.jsonl")], tmp_path / "twice")) == 2
    assert f"--data {tmp_path / 'x.jsonl'}: the same file as --data x.jsonl" in _one_error_line(capsys)


# ----- points 6 and 18: resume with another checkpoint or task -----

def test_resume_refuses_a_replaced_checkpoint_and_names_another_task(tmp_path, monkeypatch, capsys):
    ck = _save(tmp_path / "ck", 1)
    data = _docs(tmp_path / "d.jsonl", 3)
    out = tmp_path / "out"
    assert cli.main(_argv(ck, data, out)) == 0
    rows = _rows(out)
    old_id = json.loads((out / RUN_FILE).read_text())["checkpoint_id"]
    shutil.rmtree(ck)
    _save(ck, 2)                                  # another model at the same path
    from mistral_jax.checkpoint.integrity import checkpoint_identity
    new_id = checkpoint_identity(ck)
    assert new_id != old_id
    _no_load(monkeypatch)
    capsys.readouterr()
    assert cli.main(_argv(ck, data, out)) == 2
    line = _one_error_line(capsys)
    assert f"rows scored with checkpoint {ck} (identity {old_id}), now {ck} (identity {new_id}) (the checkpoint " \
        "has changed since)" in line, line
    assert _rows(out) == rows
    # another --task: the task is named, not the first other setting that differs
    assert cli.main(_argv(ck, data, out, task="choice")) == 2
    line = _one_error_line(capsys)
    assert "holds a 'perplexity' evaluation, now --task choice" in line and "delimiter" not in line, line


def test_max_length_too_short_for_the_default_overlap_says_so(ckpt, tmp_path, capsys):
    data = _docs(tmp_path / "d.jsonl", 2)
    argv = _argv(ckpt, data, tmp_path / "o")
    argv[argv.index("--max-length") + 1] = "1"
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert "--max-length 1: too short" in line and "default --overlap of 1" in line, line
    assert cli.main(argv + ["--overlap", "1"]) == 2
    assert "--overlap 1 must be smaller than --max-length 1" in _one_error_line(capsys)


# ----- point 20: a corrupt line in the middle of examples.jsonl -----

def test_a_corrupt_middle_row_loses_no_later_row(ckpt, tmp_path, capsys):
    n = 6
    data = _docs(tmp_path / "d.jsonl", n)
    out = tmp_path / "out"
    assert cli.main(_argv(ckpt, data, out)) == 0
    rows = _rows(out)
    damaged = json.loads(rows[1])["line"]
    lines = rows[:1] + ['{"key": "garbage', "[1, 2]"] + rows[2:]     # row 2 damaged, and a stray line
    (out / EXAMPLES_FILE).write_text("\n".join(lines) + '\n{"key": "torn')
    capsys.readouterr()
    assert cli.main(_argv(ckpt, data, out)) == 0
    err = capsys.readouterr().err
    s = _summary(out)
    assert (s["examples"], s["this_run"]["examples"], s["this_run"]["skipped_already_scored"]) == (n, 1, n - 1)
    assert "skipped 2 line(s) that are not rows (line 2: not valid JSON, line 3: not an object" in err, err
    assert "dropped a torn last line" in err
    now = _rows(out)
    assert now[:len(lines)] == lines and len(now) == len(lines) + 1           # kept; the re-scored row appended
    assert json.loads(now[-1])["line"] == damaged
    assert cli.main(_argv(ckpt, data, out)) == 0                            # stable: nothing scored again
    assert _summary(out)["this_run"]["examples"] == 0 and _summary(out)["examples"] == n


# ----- point 21: progress within one long document -----

def test_progress_moves_with_each_window_of_a_long_document(ckpt, tmp_path, monkeypatch, capsys):
    import tqdm

    from mistral_jax.data.tokenizer import Tokenizer

    class EveryCall(tqdm.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "mininterval": 0})
    monkeypatch.setattr(tqdm, "tqdm", EveryCall)
    text = " ".join(WORDS[:300])
    data = tmp_path / "d.jsonl"
    data.write_text("{bad json\n" + json.dumps({"text": text}) + "\n")       # an example finishes first
    n_win = len(scoring.rolling_windows(len(Tokenizer.for_vocab(32000).encode(text, bos=True)), 32, 16))
    assert n_win >= 10
    argv = _argv(ckpt, data, tmp_path / "o", "--batch-size", "1")
    argv[argv.index("--max-length") + 1] = "32"
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    frames = captured.err.split("\r")
    during = [f for f in frames if "1/2" in f and "tok_s=" in f]       # the document is being scored
    tokens = [int(re.search(r"tokens=(\d+)", f).group(1)) for f in during]
    assert len(set(tokens)) >= n_win - 1 and tokens == sorted(tokens), during
    # summary.json: tokens scored (every token after BOS, once) vs run (each window's inputs, overlaps included)
    ids = Tokenizer.for_vocab(32000).encode(text, bos=True)
    wins = scoring.rolling_windows(len(ids), 32, 16)
    s = _summary(tmp_path / "o")
    assert s["tokens_scored"] == s["tokens"] == len(ids) - 1
    assert s["tokens_run"] == sum(w.end - w.start - 1 for w in wins) == s["this_run"]["tokens"] > len(ids)
    # stdout: perplexity, bits per byte and the token counts, one "name: value" line each
    assert captured.out.splitlines() == [f"perplexity:    {s['perplexity']:.4f}",
                                         f"bits_per_byte: {s['bits_per_byte']:.4f}",
                                         f"tokens_scored: {len(ids) - 1} (tokens_run {s['tokens_run']})"]


# ----- point 12: infer.lm_eval checks --output before loading the model -----

def test_lm_eval_refuses_an_unwritable_output_before_loading(tmp_path, monkeypatch, capsys):
    import mistral_jax.evaluation.lm_eval_backend as backend
    from mistral_jax.cli import lm_eval

    def boom(*a, **k):
        raise AssertionError("the model was loaded before --output was checked")
    monkeypatch.setattr(backend, "MistralJaxLM", boom)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    folder = tmp_path / "out"
    (folder / "results.json").mkdir(parents=True)
    cases = [(a_file / "sub", "cannot create the folder"), (a_file, "exists and is not a folder"),
             (folder, "results.json is a folder")]
    if os.geteuid() != 0:                            # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cases.append((ro, "not writable"))
    for out, why in cases:
        argv = ["--checkpoint", str(tmp_path / "ck"), "--tasks", "zen_choice", "--output", str(out)]
        assert lm_eval.main(argv) == 2
        line = _one_error_line(capsys)
        assert f"--output {out}" in line and why in line, line


def test_lm_eval_prints_the_results_when_writing_fails_at_the_end(tmp_path, monkeypatch, capsys):
    import lm_eval
    import lm_eval.tasks

    import mistral_jax.evaluation.lm_eval_backend as backend
    from mistral_jax.cli import lm_eval as cli_lm

    class Tasks:
        def __init__(self, include_path=None):
            self.all_tasks = ["zen_choice"]
    results = {"results": {"zen_choice": {"acc,none": 0.75}}, "samples": {"zen_choice": []}}
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Tasks)
    monkeypatch.setattr(backend, "MistralJaxLM", lambda *a, **k: object())
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **k: results)

    def fail(out, res):
        raise PermissionError(13, "Permission denied", str(out / "results.json"))
    monkeypatch.setattr(cli_lm, "write_outputs", fail)
    assert cli_lm.main(["--checkpoint", "ck", "--tasks", "zen_choice", "--output", str(tmp_path / "o")]) == 1
    cap = capsys.readouterr()
    assert json.loads(cap.out) == {"results": {"zen_choice": {"acc,none": 0.75}}}
    assert "the results are printed on stdout" in _one_error_line_of(cap.err)

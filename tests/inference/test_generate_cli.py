"""`python -m infer.generate` end to end on tiny random models (checked against HF `generate`), and chat encoding."""

import contextlib
import json

import jax
import numpy as np
import pytest

from mistral_jax.cli import generate as cli
from mistral_jax.inference import decode
from mistral_jax.model import transformer as model
from mistral_jax.checkpoint.native import save_params
from mistral_jax.model.config import ModelConfig
from tests.checkpoint.state_dict import params_to_state_dict
from tests.inference.decode_helpers import clear_programs
from tests.model.trees import stack_layers
from mistral_jax.data.tokenizer import DEFAULT_FILES, Tokenizer, default_tokenizer_path
from mistral_jax.evaluation.output import json_line

GOOD = ["The quick brown fox", "def main():", "Once upon a time, in a land far away, there lived"]
NEW = 6


def _hf_model(cfg, params):
    """transformers.MistralForCausalLM (float32, eager) holding our params."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    hf_cfg = MistralConfig(**{k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "eager"
    m = MistralForCausalLM(hf_cfg).eval()
    m.load_state_dict({k: torch.from_numpy(v) for k, v in params_to_state_dict(params, cfg, "hf")},
                      strict=True)
    return m


def _hf_greedy(m, prompt, n, eos_id):
    """HF greedy continuation (EOS included if hit) and the smallest top-1/top-2 logit margin on the way."""
    import torch
    with torch.no_grad():
        out = m.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos_id,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack(out.scores)[:, 0].topk(2).values
    return out.sequences[0, len(prompt):].tolist(), float((top2[:, 0] - top2[:, 1]).min())


def _save(tmp_path_factory, cfg, params, name):
    path = tmp_path_factory.mktemp(name) / "ckpt"
    save_params(path, cfg, params)
    return path


def _random_params(cfg, seed):
    """Random float32 params as numpy arrays (no compilation): weights N(0, 0.08), norm scales near 1.

    Drawn param by param in the per-layer tree's order, then stacked into the scanned tree, so the values
    (and the greedy continuations the tests below rely on) do not depend on how the layers are stored."""
    import flax.linen as nn

    rs = np.random.RandomState(seed)

    def init(path, x):
        scale = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return (scale + rs.randn(*x.shape) * (0.1 if scale else 0.08)).astype(np.float32)
    per_layer = jax.tree_util.tree_map_with_path(init, nn.unbox(model.abstract_params(cfg, scan_layers=False)))
    return jax.tree_util.tree_map(np.asarray, stack_layers(per_layer, cfg.n_layers))


def _planted(tmp_path_factory, name, cfg, seed, prompt, step, new_id):
    """A checkpoint whose output column `new_id` is 1.05 x that of HF's greedy token at `step` after `prompt`,
    so that `new_id` wins there; returns (path, cfg, params, HF model with the same weights)."""
    import torch

    params = _random_params(cfg, seed)
    hf = _hf_model(cfg, params)
    t = _hf_greedy(hf, prompt, step + 1, -1)[0][step]
    params["output"][:, new_id] = 1.05 * params["output"][:, t]
    with torch.no_grad():
        hf.lm_head.weight[new_id] = torch.from_numpy(params["output"][:, new_id])
    path = tmp_path_factory.mktemp(name) / "ckpt"
    save_params(path, cfg, params)
    return path, cfg, params, hf


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny random vocab-32000 model whose EOS (id 2) wins where GOOD[1]'s greedy third token would."""
    cfg = ModelConfig.preset("tiny").replace(max_seq_len=64)
    return _planted(tmp_path_factory, "ckpt", cfg, 0, Tokenizer().encode(GOOD[1], bos=True), 2, 2)


@pytest.fixture(scope="module")
def ckpt_v3(tmp_path_factory):
    """Tiny random vocab-32768 model whose greedy first answer token for GOOD[0] is 32700 (not in v1)."""
    cfg = ModelConfig.preset("tiny").replace(max_seq_len=64, vocab_size=32768)
    return _planted(tmp_path_factory, "ckpt_v3", cfg, 1, Tokenizer.for_vocab(32768).encode(GOOD[0], bos=True), 0,
                    32700)


def _run(path, src, out, *extra):
    return cli.main(["--checkpoint", str(path), "--prompts", str(src), "--output", str(out),
                     "--max-new-tokens", str(NEW), *extra])


def _rows(out):
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_generate_cli_matches_hf_greedy_and_reports_bad_lines(ckpt, tmp_path, capsys):
    path, cfg, params, hf = ckpt
    lines = [json.dumps({"prompt": GOOD[0]}).encode(),                       # 1
             json.dumps({"prompt": "", "id": 5}).encode(),                    # 2 empty prompt
             b"{oops",                                                        # 3 not JSON
             json.dumps({"prompt": GOOD[1], "id": {"k": [1, None]}}).encode(),  # 4
             b"   ",                                                          # 5 blank: skipped
             json.dumps({"prompt": "word " * 80}).encode(),                   # 6 too long
             b'{"prompt": "\\ud800", "id": "surrogate"}',                     # 7 lone surrogate
             b'{"prompt": "caf\xe9"}',                                        # 8 not UTF-8
             json.dumps({"prompt": GOOD[2], "id": "x"}).encode(),             # 9
             json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),  # 10 no --chat
             b"[1, 2]",                                                       # 11 not an object
             json.dumps({"prompt": 5, "id": None}).encode()]                  # 12 not a string
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"\n".join(lines))                                         # no final newline
    assert _run(path, src, out, "--batch-size", "4") == 1                    # some lines failed ...
    rows = _rows(out)
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]   # ... every non-blank line answered
    err = {r["line"]: r["error"] for r in rows if "error" in r}
    assert sorted(err) == [2, 3, 6, 7, 8, 10, 11, 12]
    for n, e in err.items():
        assert e.startswith(f"{src}:{n}: ") and e.count("in.jsonl:") == 1 and "prompt " not in e.split(": ")[0], e
    assert err[2] == f"{src}:2: empty prompt" and err[10] == f"{src}:10: 'messages' given without --chat"
    assert err[12] == f"{src}:12: 'prompt' must be a string, got int" and "not valid JSON" in err[3]
    assert "exceeds the model's max_seq_len 64" in err[6] and "lone surrogate" in err[7]
    assert "not UTF-8 text (byte 0xe9" in err[8]
    assert "expected an object with 'prompt' (or 'messages'), got list" in err[11]
    assert {r["line"]: r.get("id", "-") for r in rows if "id" in r} == {2: 5, 4: {"k": [1, None]}, 7: "surrogate",
                                                                         9: "x", 12: None}
    assert rows[5]["prompt"] == "\ud800"                                      # round-trips, escaped
    stderr = capsys.readouterr().err
    assert "1 blank line(s) skipped" in stderr and "8 line(s) failed" in stderr

    tok = Tokenizer()
    reasons = []
    for row, prompt in zip([rows[0], rows[3], rows[7]], GOOD):
        ref, margin = _hf_greedy(hf, tok.encode(prompt, bos=True), NEW, tok.eos_id)
        assert margin > 1e-4                 # no near-ties: float32 differences cannot flip an argmax
        stopped = ref[-1] == tok.eos_id
        assert row["prompt"] == prompt and row["completion_ids"] == (ref[:-1] if stopped else ref)
        assert row["completion"] == tok.decode(row["completion_ids"])
        assert row["finish_reason"] == ("eos" if stopped else "length")
        assert (row["finish_reason"] == "length") == (len(row["completion_ids"]) == NEW and 2 not in ref)
        reasons.append(row["finish_reason"])
    assert reasons == ["length", "eos", "length"]      # GOOD[1] hits the planted EOS, the others run to length


@pytest.mark.slow   # one of the everyday subset's longest (issue 20, point 7)
def test_generate_cli_chat_lines(ckpt, tmp_path):
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path, cfg, params, hf = ckpt
    good = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    user_then_assistant = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    bad = {2: ("x", "must be a list"), 3: ([1, 2], "messages[0]: expected an object"),
           4: (None, "must be a list"), 5: ([good[0]], "user message first"),
           6: ([], "'messages' is empty"), 7: (user_then_assistant, "must end with a user message"),
           8: ([{"role": "tool", "content": "a"}], "'role' must be one of")}
    lines = [{"messages": good, "id": 1}] + [{"messages": m, "id": n} for n, (m, _) in bad.items()] + [{"prompt": "hi"}]
    src, out = tmp_path / "chat.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert _run(path, src, out, "--chat") == 1
    rows = _rows(out)
    assert len(rows) == 9
    for n, (_, msg) in bad.items():
        row = rows[n - 1]
        assert row["id"] == n and row["error"].startswith(f"{src}:{n}: ") and msg in row["error"]
    ref = MistralTokenizer.v1()
    prompts = [ref.encode_chat_completion(ChatCompletionRequest(messages=m)).tokens
               for m in ([SystemMessage(content="Be brief."), UserMessage(content="Name a colour.")],
                         [UserMessage(content="hi")])]
    expected = decode.generate(params, cfg, prompts, NEW, eos_id=2)
    assert [rows[0]["completion_ids"], rows[8]["completion_ids"]] == expected
    assert rows[0]["messages"] == good and rows[8]["prompt"] == "hi"


@pytest.mark.slow   # one of the everyday subset's longest (issue 20, point 7)
def test_sampled_rows_are_independent_of_batches_and_reproducible(ckpt, tmp_path):
    path = ckpt[0]
    src = tmp_path / "same.jsonl"
    src.write_text((json.dumps({"prompt": "Hello"}) + "\n") * 32)

    def sample(name, *extra):
        out = tmp_path / name
        assert _run(path, src, out, "--temperature", "1", "--max-new-tokens", "4", *extra) == 0
        return [tuple(r["completion_ids"]) for r in _rows(out)]

    a = sample("a.jsonl", "--batch-size", "8", "--seed", "11")
    assert len(a) == 32 and len(set(a)) == 32            # every row drew its own sample, across batches too
    assert sample("b.jsonl", "--batch-size", "8", "--seed", "11") == a
    # (that a row's draws depend on its row id, not its batch or position: test_decode.py)
    c = sample("d.jsonl", "--batch-size", "8", "--seed", "12")
    assert c != a and len(set(c) & set(a)) == 0


@pytest.mark.slow
def test_vocab_32768_model_gets_the_v3_tokenizer(ckpt_v3, tmp_path, capsys):
    path, cfg, params, _ = ckpt_v3
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": GOOD[0]}) + "\n")
    assert _run(path, src, out) == 0
    (row,) = _rows(out)
    tok = Tokenizer.for_vocab(32768)
    assert tok.path.name == DEFAULT_FILES[32768] and tok.vocab_size == 32768
    assert row["completion_ids"][0] == 32700                              # an id the v1 tokenizer lacks
    assert row["completion_ids"] == decode.generate(params, cfg, [tok.encode(GOOD[0], bos=True)], NEW, eos_id=2)[0]
    assert row["completion"] == tok.decode(row["completion_ids"])
    capsys.readouterr()
    assert _run(path, src, tmp_path / "o2.jsonl", "--tokenizer", str(default_tokenizer_path(32000))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "32000 pieces" in err and "vocab_size is 32768" in err
    unversioned = tmp_path / "tok.model"           # the v3 pieces under a name mistral-common reads as v1
    unversioned.write_bytes(default_tokenizer_path(32768).read_bytes())
    assert _run(path, src, tmp_path / "o4.jsonl", "--tokenizer", str(unversioned), "--chat") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reads it as v1 but [INST] is a control token" in err
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes(b"not a sentencepiece model\n")
    assert _run(path, src, tmp_path / "o3.jsonl", "--tokenizer", str(bogus)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bogus.model: not a readable SentencePiece model" in err


def test_output_is_checked_first_and_written_atomically(ckpt, tmp_path, capsys, monkeypatch):
    path = ckpt[0]
    src = tmp_path / "in.jsonl"
    text = json.dumps({"prompt": GOOD[0]}) + "\n"
    src.write_text(text)
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    for out, msg in [(src, "is the --prompts file"), (link, "is the --prompts file"),
                     (tmp_path / "no" / "out.jsonl", "does not exist")]:
        # a missing checkpoint shows the output is checked before the model is loaded
        assert _run(tmp_path / "missing-ckpt", src, out, "--overwrite") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err and "missing-ckpt" not in err
    assert src.read_text() == text
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    assert _run(path, src, out) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "previous\n"

    real_atomic_file = cli.atomic_file

    class Full:                               # a disk that fills up on the first row
        def write(self, b):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

    @contextlib.contextmanager
    def full_disk(path, mode):
        with real_atomic_file(path, mode):
            yield Full()

    monkeypatch.setattr(cli, "atomic_file", full_disk)
    assert _run(path, src, out, "--overwrite") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: writing {out}: No space left on device"]
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["in.jsonl", "link.jsonl", "out.jsonl"]                    # no temporary file left behind
    monkeypatch.undo()
    assert _run(path, src, out, "--overwrite") == 0
    assert _rows(out)[0]["prompt"] == GOOD[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "link.jsonl", "out.jsonl"]


def test_generate_cli_one_off_prompt_and_bad_arguments(ckpt, tmp_path, capsys):
    path, cfg, params, hf = ckpt
    # the same batch shape and settings as the atomic-write test's run: no new compilation
    assert cli.main(["--checkpoint", str(path), "--prompt", GOOD[0], "--max-new-tokens", str(NEW)]) == 0
    printed = capsys.readouterr().out
    tok = Tokenizer()
    prompt_ids = tok.encode(GOOD[0], bos=True)
    ids, _ = _hf_greedy(hf, prompt_ids, NEW, tok.eos_id)
    # the prompt, then its completion: the text the completion's ids decode to after the prompt's ids
    head, full = tok.decode(prompt_ids), tok.decode(prompt_ids + ids)
    assert full.startswith(head) and printed == GOOD[0] + full[len(head):] + "\n" and tok.eos_id not in ids
    assert printed.rstrip("\n").endswith(tok.decode(ids).strip()) and len(printed) > len(GOOD[0]) + 1
    assert cli.main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(path), "--prompt", "x", "--mesh", "3,1,1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs 3 devices" in err
    for flags, msg in [(["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
                       (["--prefill-chunk", "-5"], "--prefill-chunk: must be >= 1, got -5"),
                       (["--seed", str(10**20)], f"--seed: must be in [0, {2**32 - 1}]"),
                       (["--seed", "-1"], "--seed: must be in"),
                       (["--temperature", "nan"], "--temperature: expected a finite number"),
                       (["--top-p", "0"], "top_p must be in (0, 1]"),
                       (["--mesh", "1,x,1"], "--mesh: expected data,fsdp,tensor"),
                       (["--mesh", "1,1"], "--mesh: expected data,fsdp,tensor"),
                       (["--dtype", "int8"], "argument --dtype: unsupported dtype int8"),
                       (["--max-new-tokens", "many"], "expected an integer, got 'many'")]:
        with pytest.raises(SystemExit) as e:
            cli.main(["--checkpoint", str(path), "--prompt", "x", *flags])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (flags, err)


def test_one_off_prompt_is_shown_before_its_completion():
    tok = Tokenizer()
    prompt_ids, comp = tok.encode("The quick brown", bos=True), tok.encode("fox jumps")
    row = {"line": 1, "prompt": "The quick brown", "completion": tok.decode(comp), "completion_ids": comp}
    assert row["completion"] == "fox jumps"            # the first piece is "▁...": its space is dropped
    assert cli.shown_with_prompt(False, tok, {0: prompt_ids})(0, row) == "The quick brown fox jumps"
    assert cli.shown_with_prompt(True, tok, {0: prompt_ids})(0, row) == "The quick brown\nfox jumps"


def test_chat_encoding_v1_and_v3_literal_pieces():
    """Instruct encodings against the rule written from raw SentencePiece pieces (see REFERENCE.md)."""
    turns = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And 3+3?\n- one"}]
    system = [{"role": "system", "content": "Answer briefly."}]
    v1 = Tokenizer()
    sp = v1.sp.encode
    assert v1.encode_chat(turns) == ([1] + sp("[INST] What is 2+2? [/INST]") + sp("4") + [2]
                                     + sp("[INST] And 3+3?\n- one [/INST]"))
    assert v1.encode_chat(system + turns) == ([1] + sp("[INST] Answer briefly.\n\nWhat is 2+2? [/INST]") + sp("4")
                                              + [2] + sp("[INST] And 3+3?\n- one [/INST]"))
    assert sp("[INST]") == [733, 16289, 28793] and v1.encode("Hello world", bos=True) == [1, 22557, 1526]
    v3 = Tokenizer.for_vocab(32768)
    sp = v3.sp.encode
    assert v3.encode_chat(turns) == [1, 3] + sp("What is 2+2?") + [4] + sp("4") + [2, 3] + sp("And 3+3?\n- one") + [4]
    assert v3.encode_chat(system + turns) == ([1, 3] + sp("What is 2+2?") + [4] + sp("4") + [2, 3]
                                              + sp("Answer briefly.\n\nAnd 3+3?\n- one") + [4])   # system: last turn
    assert v3.encode_chat([turns[0]]) == [1, 3, 2592, 1117, 29473, 29518, 29574, 29518, 29572, 4]
    with pytest.raises(ValueError, match="must end with a user message"):
        v1.encode_chat(turns[:2])
    with pytest.raises(ValueError, match="lone surrogate"):
        v3.encode_chat([{"role": "user", "content": "\ud800"}])
    with pytest.raises(ValueError, match="no default tokenizer for a model vocab of 1000"):
        Tokenizer.for_vocab(1000)


def test_output_rows_escape_lone_surrogates():
    line = json_line({"prompt": "\ud800x", "completion": "é"})
    assert json.loads(line.decode("utf-8")) == {"prompt": "\ud800x", "completion": "é"}
    assert line.endswith(b"\n") and line.count(b"\n") == 1


def test_plan_batches_groups_similar_lengths():
    lengths = [5, 40, 3, 40, 12, 3, 7]
    assert cli.plan_batches(lengths, 3) == [[2, 5, 0], [6, 4, 1], [3]]     # by length, ties in input order
    assert cli.plan_batches(lengths, 10) == [[2, 5, 0, 6, 4, 1, 3]]
    with pytest.raises(ValueError, match="^plan_batches: batch_size must be an integer >= 1, got 0$"):
        cli.plan_batches(lengths, 0)


@pytest.mark.slow   # one of the everyday subset's longest (issue 20, point 7)
def test_length_sorted_batches_keep_input_order_and_results(ckpt, tmp_path, capsys):
    """Lines of mixed lengths are batched by length, written in input order, each equal to its own greedy run."""
    path, cfg, params, _ = ckpt
    texts = ["Once upon a time, in a land far away, there lived a king", "Hi", "def main():",
             "The quick brown fox jumps over", "A"]
    src, out = tmp_path / "mixed.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    clear_programs()                      # count this run's compilations alone, whatever ran before
    assert _run(path, src, out, "--batch-size", "2") == 0          # 3 batches, the last with one filler row
    rows = _rows(out)
    assert [r["id"] for r in rows] == list(range(5)) and [r["prompt"] for r in rows] == texts
    tok = Tokenizer()
    alone = [decode.generate(params, cfg, [tok.encode(t, bos=True)], NEW, eos_id=tok.eos_id)[0] for t in texts]
    assert [r["completion_ids"] for r in rows] == alone
    summary = capsys.readouterr().err
    # the 3 batches' longest prompts differ (3 programs with exact shapes), but every length up to max_seq_len 64
    # shares the smallest bucket: one program
    tok_lengths = [len(tok.encode(t, bos=True)) for t in texts]
    longest = [max(tok_lengths[i] for i in b) for b in cli.plan_batches(tok_lengths, 2)]
    assert len({decode.decode_shapes(cfg, n, NEW, bucket_smallest=None) for n in longest}) == 3, longest
    assert len({decode.decode_shapes(cfg, n, NEW) for n in longest}) == 1
    assert "; 1 program(s) compiled)" in summary, summary

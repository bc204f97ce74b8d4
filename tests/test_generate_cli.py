"""`python -m infer.generate` end to end on a tiny random model, and the v1 chat encoding."""

import json

import jax
import pytest

from infer import generate as cli
from mistral_jax import decode, model
from mistral_jax.checkpoint import save_params
from mistral_jax.config import ModelConfig
from mistral_jax.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = ModelConfig.preset("tiny").replace(max_seq_len=64)
    params = model.init_params(cfg, jax.random.key(0))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_params(path, cfg, params)
    return path, cfg, params


def test_generate_cli_writes_every_prompt_and_reports_bad_ones(ckpt, tmp_path, capsys):
    path, cfg, params = ckpt
    good = ["The quick brown fox", "def main():", "Once upon a time, in a land far away, there lived"]
    lines = [json.dumps({"prompt": good[0]}), json.dumps({"prompt": ""}), "{oops", json.dumps({"prompt": good[1]}),
             json.dumps({"prompt": "word " * 80}), json.dumps({"prompt": good[2]})]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    rc = cli.main(["--checkpoint", str(path), "--prompts", str(src), "--output", str(out),
                   "--max-new-tokens", "6", "--batch-size", "2"])
    assert rc == 1                                    # some prompts failed ...
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6                             # ... but every line got an answer, in order
    assert "empty prompt" in rows[1]["error"]
    assert "in.jsonl:3: not valid JSON" in rows[2]["error"]
    assert "prompt 4:" in rows[4]["error"] and "max_seq_len 64" in rows[4]["error"]
    tok = Tokenizer()
    expected = decode.generate(params, cfg, [tok.encode(p, bos=True) for p in good], 6, eos_id=tok.eos_id)
    for row, prompt, ids in zip([rows[0], rows[3], rows[5]], good, expected):
        assert row["prompt"] == prompt and row["completion_ids"] == ids
        assert row["completion"] == tok.decode(ids) and row["finish_reason"] in ("eos", "length")
    assert "tokens/s" in capsys.readouterr().err


def test_generate_cli_one_off_prompt_and_bad_arguments(ckpt, tmp_path, capsys):
    path, cfg, params = ckpt
    assert cli.main(["--checkpoint", str(path), "--prompt", "Hello world", "--max-new-tokens", "4",
                     "--temperature", "0.7", "--top-k", "20", "--seed", "1"]) == 0
    printed = capsys.readouterr().out.strip()
    tok = Tokenizer()
    ids = decode.generate(params, cfg, [tok.encode("Hello world", bos=True)], 4, temperature=0.7, top_k=20, seed=1,
                          eos_id=tok.eos_id)[0]
    assert printed == tok.decode(ids).strip()
    assert cli.main(["--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(path), "--prompt", "x", "--batch-size", "0"])
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


def test_chat_encoding_matches_mistral_common_v1():
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    turns = [("user", "What is the capital of France?"), ("assistant", "Paris."),
             ("user", "And of Italy? Answer in one word."), ("assistant", "Rome"),
             ("user", "Thanks! Now list three rivers:\n- one\n- two")]
    cls = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    ref = MistralTokenizer.v1()
    tok = Tokenizer()
    for system in (None, "Answer briefly."):
        msgs = ([("system", system)] if system else []) + turns
        expected = ref.encode_chat_completion(
            ChatCompletionRequest(messages=[cls[r](content=c) for r, c in msgs])).tokens
        assert tok.encode_chat([{"role": r, "content": c} for r, c in msgs]) == expected
    assert tok.encode("Hello world", bos=True) == [1, 22557, 1526]
    with pytest.raises(ValueError, match="chat message 1: role 'user'"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])

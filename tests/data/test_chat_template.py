"""`infer.generate --chat` on a vocab-32768 (v0.3) model prompts with the v3 instruct template ([INST]=3 and
[/INST]=4 control tokens), token for token as mistral-common encodes it, through the fine-tuning encoder."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from mistral_jax.cli import generate as cli
from mistral_jax.inference import decode
from mistral_jax.model import transformer as model
from mistral_jax.checkpoint.native import save_params
from mistral_jax.model.config import ModelConfig
from mistral_jax.data.chat_template import encode_conversation
from mistral_jax.data.tokenizer import Tokenizer

DIALOGUE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


@pytest.fixture(scope="module")
def v3_ckpt(tmp_path_factory):
    """A tiny random vocab-32768 native checkpoint (params drawn with numpy: nothing compiled)."""
    cfg = ModelConfig.preset("tiny").replace(max_seq_len=64, vocab_size=32768, n_layers=1)
    rs = np.random.RandomState(0)
    params = jax.tree_util.tree_map(lambda x: (rs.randn(*x.shape) * 0.08).astype(np.float32),
                                    nn.unbox(model.abstract_params(cfg)))
    path = tmp_path_factory.mktemp("v3") / "ckpt"
    save_params(path, cfg, params)
    return path


def test_generate_chat_uses_the_v3_template(v3_ckpt, tmp_path, monkeypatch):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    seen = []
    real = decode.generate

    def spy(params, cfg, prompts, *args, **kwargs):
        seen.extend([list(p) for p in prompts])
        out = real(params, cfg, prompts, *args, **kwargs)
        seen_out.extend(out.tokens)
        return out
    seen_out = []
    monkeypatch.setattr(decode, "generate", spy)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"messages": DIALOGUE}) + "\n" + json.dumps({"prompt": "Name a colour."}) + "\n")
    assert cli.main(["--checkpoint", str(v3_ckpt), "--prompts", str(src), "--output", str(out), "--chat",
                     "--max-new-tokens", "2", "--batch-size", "2"]) == 0

    v3 = MistralTokenizer.v3()
    cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    want = [v3.encode_chat_completion(ChatCompletionRequest(messages=[cls[m["role"]](content=m["content"])
                                                                      for m in msgs])).tokens
            for msgs in (DIALOGUE, [{"role": "user", "content": "Name a colour."}])]
    sp = Tokenizer.for_vocab(32768).sp.encode
    assert want[0] == ([1, 3] + sp("What is 2+2?") + [4] + sp("4") + [2, 3] + sp("Be brief.\n\nAnd 3+3?") + [4])
    assert want[1] == [1, 3] + sp("Name a colour.") + [4]
    assert sorted(seen, key=len) == sorted(want, key=len)               # the prompts the model was given
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["completion_ids"] for r in rows) == sorted(seen_out)
    # the same encoder as fine-tuning: a training conversation's ids continue the generation prompt
    ids, mask = encode_conversation(DIALOGUE + [{"role": "assistant", "content": "6"}],
                                              Tokenizer.for_vocab(32768))
    assert ids[:len(want[0])] == want[0] and ids[len(want[0]):] == sp("6") + [2]
    assert all(mask[len(want[0]):]) and sum(mask) == len(sp("4")) + 1 + len(sp("6")) + 1


def test_generate_safe_prompt_puts_exactly_the_guardrail_prompt(v3_ckpt, tmp_path, monkeypatch):
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    guardrail = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid "
                 "harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and "
                 "positivity.")
    seen = []
    real = decode.generate
    monkeypatch.setattr(decode, "generate", lambda p, c, prompts, *a, **k: (seen.extend(map(list, prompts)),
                                                                          real(p, c, prompts, *a, **k))[1])
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"prompt": "Name a colour."}) + "\n" + json.dumps({"messages": DIALOGUE}) + "\n")
    assert cli.main(["--checkpoint", str(v3_ckpt), "--prompts", str(src), "--output", str(out), "--safe-prompt",
                     "--max-new-tokens", "1"]) == 1          # line 2 has its own system message: refused
    want = MistralTokenizer.v3().encode_chat_completion(ChatCompletionRequest(
        messages=[SystemMessage(content=guardrail), UserMessage(content="Name a colour.")])).tokens
    assert seen == [want]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert "own system message" in rows[1]["error"]

"""The held-out example a fine-tuning run logs before and after training: one readable line for the prompt's
last user message and one for the answer and reference (not a repr of the whole decoded prompt)."""

import pytest

from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.training.heldout import EXAMPLE_WIDTH, example_lines

CHAT = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "What is 2 +\n 3? " + "x" * 300}]


@pytest.mark.parametrize("vocab", [32000, 32768])   # [INST] as text (v1) and as control tokens (v3)
def test_example_is_the_last_user_message_and_the_answer_one_line_each(vocab):
    tok = Tokenizer.for_vocab(vocab) if vocab == 32768 else Tokenizer()
    text = example_lines("held-out (before)", tok, tok.encode_chat(CHAT), "5\n\n and 'more'", "5")
    user, answer = text.split("\n")
    assert user.startswith("held-out (before) example: user: What is 2 + 3? xxx") and user.endswith("x...")
    assert len(user) == len("held-out (before) example: user: ") + EXAMPLE_WIDTH
    assert "hi there" not in user and "[INST]" not in user
    assert answer == "  -> model: 5 and 'more' | reference: 5"

"""The settings of an evaluation run and how its examples become token ids.

Tokenisation follows lm-evaluation-harness: a (context, continuation) pair is encoded as BOS + the whole
text, and the continuation is what follows the tokens of BOS + context; trailing spaces of the context
move to the continuation.

Chat: generate's "messages" examples, and plain prompts or moderation texts with `Settings.chat`, are
encoded by mistral-common (`Tokenizer.encode_chat`), the system prompt (if any) as the first message.

Few-shot prefix (choice, generate): each shot is context + delimiter + its answer (choice: the labelled
choice; generate: the target), the shots and then the example's own context joined by FEWSHOT_DELIMITER
(a blank line). For chat prompts each shot is a user turn (its prompt or messages) followed by an assistant
turn (its target), before the example's messages.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.evaluation.examples import Example, check_prompt_fields
from mistral_jax.evaluation.fewshot import FEWSHOT_DELIMITER, FewShot


@dataclasses.dataclass
class Settings:
    """Settings of one evaluation run (those that change results are recorded in run.json)."""
    max_input: int
    overlap: int
    batch_size: int = 8
    delimiter: str = " "
    chat: bool = False
    system_prompt: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    token_logprobs: bool = False
    moderation_template: str = ""
    fewshot: FewShot | None = None


# the settings run.json records per task: a resumed run must match them
RUN_SETTINGS = {"perplexity": ("max_input", "overlap", "token_logprobs"),
                "choice": ("max_input", "delimiter"),
                "moderate": ("max_input", "delimiter", "chat", "system_prompt", "moderation_template"),
                "generate": ("chat", "system_prompt", "delimiter", "max_new_tokens", "temperature", "top_k",
                             "top_p", "seed")}


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(BOS + context ids, continuation ids) as lm-evaluation-harness's causal models split them."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        return [tok.bos_id], tok.encode(continuation)
    whole = tok.encode(context + continuation, bos=True)
    ctx = tok.encode(context, bos=True)
    return ctx, whole[len(ctx):]


def check_vocab(ids: Sequence[int], vocab: int) -> None:
    """ValueError naming the first few ids outside [0, vocab)."""
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token id(s) {bad[:5]} outside the model's vocabulary [0, {vocab})")


def _turns(obj: dict[str, Any], where: str) -> list[Any]:
    """The messages of a generate example ('prompt' becomes one user turn)."""
    if "messages" not in obj:
        return [{"role": "user", "content": obj["prompt"]}]
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise ValueError(f"{where}'messages' must be a list of {{'role', 'content'}} objects, got "
                         f"{type(msgs).__name__}")
    return msgs


def _is_system(m: Any) -> bool:
    return isinstance(m, dict) and m.get("role") == "system"


def encode_prompt(obj: dict[str, Any], tok: Tokenizer, st: Settings, shots: Sequence[Example] = ()) -> list[int]:
    """Prompt ids of a generate example: 'messages' (chat) or 'prompt' (chat-wrapped with st.chat or a
    system prompt), after few-shot `shots` (examples with 'target'; prefix format in the module note)."""
    check_prompt_fields(obj)
    if "messages" not in obj and not st.chat and st.system_prompt is None:
        parts = []
        for sh in shots:
            if "prompt" not in sh.obj:
                raise ValueError(f"few-shot example {sh.where} has 'messages'; a plain prompt needs 'prompt' shots")
            parts.append(sh.obj["prompt"] + st.delimiter + sh.obj["target"])
        return tok.encode(FEWSHOT_DELIMITER.join(parts + [obj["prompt"]]), bos=True)
    msgs = list(_turns(obj, ""))
    system = st.system_prompt
    if msgs and _is_system(msgs[0]):
        if system is not None:
            raise ValueError("'messages' starts with a system message and a system prompt was given "
                             "(--system-prompt/--safe-prompt); give one of them")
        system, msgs = msgs[0].get("content"), msgs[1:]
    prefix: list[Any] = []
    for sh in shots:
        turns = [m for m in _turns(sh.obj, f"few-shot example {sh.where}: ") if not _is_system(m)]
        prefix += turns + [{"role": "assistant", "content": sh.obj["target"]}]
    head = [] if system is None else [{"role": "system", "content": system}]
    return tok.encode_chat(head + prefix + msgs)

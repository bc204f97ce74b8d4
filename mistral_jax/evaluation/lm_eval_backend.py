"""lm-evaluation-harness model backend "mistral-jax" over `scoring.Scorer` and `decode.generate`.

    from mistral_jax.evaluation.lm_eval_backend import MistralJaxLM
    lm = MistralJaxLM("ckpt/mistral-7b", batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

or `lm_eval --model mistral-jax --model_args checkpoint=ckpt/mistral-7b` once this module is imported.

Tokenisation is lm-eval's (`TemplateLM`): BOS + context; a continuation is the tokens of the whole text
after those of the context. Requests longer than max_length + 1 tokens keep their last max_length + 1
tokens, as lm-eval's `hf` backend does. `loglikelihood_rolling` scores BOS + the text's tokens with
`scoring.rolling_windows(n, max_length, rolling_overlap)`; the default overlap 1 is lm-eval's own rolling
rule, so results equal the `hf` backend's (with add_bos_token=False there, so it does not score a second
BOS). Chat prompts are encoded by mistral-common (`apply_chat_template` returns the decoded text and
remembers its exact ids, which every later use of that text as a context reuses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from mistral_jax.checkpoint.native import load_params
from mistral_jax.data.tokenizer import Tokenizer
from mistral_jax.inference import decode, scoring
from mistral_jax.model import sharding
from mistral_jax.runtime.dtypes import parse_dtype

MODEL_NAME = "mistral-jax"


@register_model(MODEL_NAME)
class MistralJaxLM(TemplateLM):
    """lm-eval LM: loglikelihood, loglikelihood_rolling, generate_until and mistral-common chat prompts.

    Either `checkpoint` (any folder `load_params` reads) or `params` + `cfg` is given. max_length: the
    evaluation context in tokens (default the model's max_seq_len); mesh: "data,fsdp,tensor" or a Mesh.
    """

    def __init__(self, checkpoint: str | None = None, *, params: Any = None, cfg: Any = None,
                 tokenizer: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, rolling_overlap: int = 1, dtype: str = "float32", mesh: Any = None,
                 smallest_bucket: int = 64, seed: int = 0, **ignored: Any):
        super().__init__()
        self._dtype = parse_dtype(dtype, "dtype") if isinstance(dtype, str) else jnp.dtype(dtype)
        if isinstance(mesh, str):
            mesh = sharding.make_mesh(*sharding.parse_mesh(mesh))
        self.mesh = mesh
        if checkpoint is not None:
            cfg, params = load_params(checkpoint, mesh=mesh, dtype=self._dtype, progress=False)
        elif params is None or cfg is None:
            raise ValueError("MistralJaxLM: give checkpoint=PATH, or params and cfg")
        self.cfg, self.params = cfg, params
        self.tok = Tokenizer(tokenizer) if tokenizer else Tokenizer.for_vocab(cfg.vocab_size)
        self.tok.check_model_vocab(cfg.vocab_size)
        self._max_length = int(max_length or cfg.max_seq_len)
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.rolling_overlap = int(rolling_overlap)
        self.seed = int(seed)
        self.scorer = scoring.Scorer(params, cfg, mesh=mesh, dtype=self._dtype, batch_size=self.batch_size,
                                     max_input=self._max_length,
                                     smallest_bucket=min(int(smallest_bucket), self._max_length))
        self._chat_ids: dict[str, list[int]] = {}

    # ----- tokenisation (TemplateLM) -----

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"{MODEL_NAME}:{Path(self.tok.path).name}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return f"mistral-common:{Path(self.tok.path).name}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Ids of `string`, with BOS unless add_special_tokens is False; a chat prompt reuses its exact ids."""
        if string in self._chat_ids:
            ids = self._chat_ids[string]
            return ids if add_special_tokens is not False else ids[1:]
        return self.tok.encode(string, bos=add_special_tokens is not False)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n = len(context) - len(context.rstrip())
        if context in self._chat_ids or (n and context[:-n] in self._chat_ids):
            if n and context not in self._chat_ids:
                context, continuation = context[:-n], context[-n:] + continuation
            return self._chat_ids[context], self.tok.encode(continuation)
        return super()._encode_pair(context, continuation)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The dialogue as mistral-common encodes it, as text; its ids are kept for this exact text."""
        msgs = [dict(m) for m in chat_history]
        prefill = None
        if not add_generation_prompt and msgs and msgs[-1].get("role") == "assistant":
            prefill = msgs.pop()["content"]
        ids = self.tok.encode_chat(msgs)
        if prefill:
            ids = ids + self.tok.encode(prefill)
        text = self.tok.decode(ids)
        self._chat_ids[text] = ids
        return text

    # ----- requests -----

    def _score(self, reqs: list[tuple[list[int], int]], desc: str, disable_tqdm: bool) -> list[scoring.Scored]:
        bar = tqdm(total=len(reqs), desc=desc, disable=disable_tqdm)
        try:
            return self.scorer.score(reqs, lambda idx, res, n: bar.update(len(idx)))
        finally:
            bar.close()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        reqs = []
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("loglikelihood: a continuation encodes to no tokens")
            ids = (list(ctx) + list(cont))[-(self._max_length + 1):]
            reqs.append((ids, min(len(cont), len(ids) - 1)))
        res = self._score(reqs, "loglikelihood", disable_tqdm)
        out = []
        for (key, _, _), r in zip(requests, res):
            ans = (r.total, r.is_greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
            out.append(ans)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        reqs, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            ids = [self.tok.bos_id] + self.tok_encode(text, add_special_tokens=False)
            for w in scoring.rolling_windows(len(ids), self._max_length, self.rolling_overlap):
                reqs.append((ids[w.start:w.end], w.n_score))
                owner.append(i)
        res = self._score(reqs, "loglikelihood_rolling", disable_tqdm)
        totals = [0.0] * len(requests)
        for i, r in zip(owner, res):
            totals[i] += r.total
        for req, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, t)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tok.decode([self.tok.eos_id])
        groups: dict[tuple, list[int]] = {}
        parsed = []
        for i, req in enumerate(requests):
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample, temp = kw.get("do_sample"), float(kw.get("temperature") or 0.0)
            if not (do_sample or (do_sample is None and temp > 0)):
                temp = 0.0                               # greedy, as lm-eval's hf backend
            elif temp == 0.0:
                temp = 1.0                               # do_sample without a temperature
            ids = self.tok_encode(context)
            ids = ids[-max(1, self._max_length - max_new):]
            parsed.append((ids, until))
            groups.setdefault((max_new, temp), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for (max_new, temp), idx in groups.items():
            idx.sort(key=lambda i: -len(parsed[i][0]))
            for s in range(0, len(idx), self.batch_size):
                batch = idx[s:s + self.batch_size]
                comps = decode.generate(self.params, self.cfg, [parsed[i][0] for i in batch], max_new,
                                        temperature=temp, seed=self.seed, row_ids=batch, mesh=self.mesh,
                                        dtype=self._dtype, eos_id=self.tok.eos_id,
                                        pad_batch_to=self.batch_size if len(idx) > self.batch_size else None)
                for i, comp in zip(batch, comps):
                    text = self.tok.decode(comp)
                    for stop in parsed[i][1]:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

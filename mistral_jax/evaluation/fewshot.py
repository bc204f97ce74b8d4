"""Few-shot examples (choice, generate): which examples may be shots and which K each example gets.

K examples are drawn without replacement from the few-shot pool (a separate file, or the same data excluding
the example itself) by random.Random(f"{seed}:{file name}:{line}"), so the draw for an example does not
depend on batching, order or resume. How shots become a prompt prefix: `encoding`.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Sequence

from mistral_jax.errors import EvalError
from mistral_jax.evaluation.examples import FEWSHOT_TASKS, Example, check_choice, check_prompt_fields

FEWSHOT_DELIMITER = "\n\n"      # between the shots and the example's own context


@dataclasses.dataclass
class FewShot:
    """k shots per example, drawn with `seed` from `pool` (valid examples); same_file: the pool is the
    evaluated data itself, and an example never gets itself as a shot."""
    k: int
    pool: list[Example]
    seed: int
    same_file: bool

    def draw(self, ex: Example) -> list[Example]:
        """The k shots of example `ex` (deterministic in seed, ex's file name and line); ValueError if the
        pool is too small."""
        cands = [p for p in self.pool if not (self.same_file and p.key == ex.key)]
        if len(cands) < self.k:
            raise ValueError(f"--num-fewshot {self.k}: only {len(cands)} usable few-shot example(s) to draw from")
        rng = random.Random(f"{self.seed}:{Path(ex.key.rsplit(':', 1)[0]).name}:{ex.line}")
        return rng.sample(cands, self.k)


def fewshot_pool(examples: Sequence[Example], task: str) -> list[Example]:
    """The examples usable as shots: choice, valid choice examples; generate, examples with a string
    'target' and a valid 'prompt' or 'messages'. EvalError for a task without few-shot."""
    if task not in FEWSHOT_TASKS:
        raise EvalError(f"--num-fewshot: not supported for task {task!r} (only {', '.join(FEWSHOT_TASKS)})")
    out = []
    for ex in examples:
        if ex.error is not None or not isinstance(ex.obj, dict):
            continue
        try:
            if task == "choice":
                check_choice(ex.obj)
            else:
                check_prompt_fields(ex.obj)
                if not isinstance(ex.obj.get("target"), str):
                    continue
        except ValueError:
            continue
        out.append(ex)
    return out

"""The demo's verifiable task: write characters of the class the prompt asks for.

Prompts look like ``"digits: 4"`` and a completion earns the fraction of its
characters that belong to the requested class (digits, lowercase or uppercase
letters). A randomly initialised model scores ~0.1-0.3; the class is decided by
the prompt, so the policy must condition on it — and it can learn that in tens
of GRPO steps on two CPU cores, which makes the reward curve visible.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

CHAR_CLASSES: dict[str, str] = {
    "digits": string.digits,
    "lower": string.ascii_lowercase,
    "upper": string.ascii_uppercase,
}


@dataclass(frozen=True, kw_only=True)
class TaskPrompt:
    text: str
    char_class: str


def make_prompts(num_prompts: int, rng: random.Random) -> list[TaskPrompt]:
    """Sample prompts, each naming a character class and a random seed character."""
    prompts = []
    for _ in range(num_prompts):
        char_class = rng.choice(sorted(CHAR_CLASSES))
        seed_char = rng.choice(CHAR_CLASSES[char_class])
        prompts.append(TaskPrompt(text=f"{char_class}: {seed_char}", char_class=char_class))
    return prompts


def reward(prompt: TaskPrompt, completion: str) -> float:
    """Fraction of the completion's characters in the prompt's class (0 for empty)."""
    if not completion:
        return 0.0
    allowed = CHAR_CLASSES[prompt.char_class]
    return sum(ch in allowed for ch in completion) / len(completion)

"""The embedded default task for a real chat model: instructions with checkable constraints.

A prompt asks for a short text on a subject under two to four constraints, e.g.

    Write about the ocean in 6 to 14 words. Use the word "blue". Write in lowercase only.

The constraints (each scored in [0, 1] by :meth:`ConstraintTask.rubric`):

    length     "in A to B words": 1 inside the range, falling linearly to 0 at half the range's size
               outside it (always present)
    subject    the subject's key word appears (always present, so that an empty answer scores low)
    include    "Use the word X."
    avoid      "Do not use the word X."
    lowercase  "Write in lowercase only." (no upper-case letter)
    exclaim    "End with an exclamation mark."
    no_comma   "Do not use commas."
    start      "Start with the word X."

The gold score of an answer is the mean of its prompt's constraint scores, in [0, 1]; the best answer scores
1.0. The simulated labeler ranks K answers by the gold score plus Gaussian noise (labelers disagree); the
reward model only ever sees those rankings; the gold scorer is used by the labeler, to pick the SFT
demonstrations and by the held-out evaluation, never by PPO; GRPO may take it as a verifiable reward
(:func:`rubric_reward`).

The SFT demonstrations simulate a labeler who writes answers from a draft: the best of K samples of the base
model under the rubric, then edited (:meth:`ConstraintTask.demonstration`) to meet each of the prompt's
constraints with probability ``fix_prob`` — cut to the length range, the word to use put in, the word to
avoid taken out, the first word, no commas, lowercase, the exclamation mark. A careful but imperfect writer:
the SFT policy learns each behaviour without learning it for every prompt, which leaves the reward model
contrasting answers to learn from and PPO a behaviour to make reliable.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from rlhf_fast.pipeline.task import noisy_ranks

SUBJECTS: tuple[tuple[str, str], ...] = (
    ("the ocean", "ocean"), ("coffee", "coffee"), ("a rainy day", "rain"), ("cats", "cat"), ("the moon", "moon"),
    ("a forest", "forest"), ("bread", "bread"), ("winter", "winter"), ("a city at night", "city"),
    ("music", "music"), ("a garden", "garden"), ("the mountains", "mountain"), ("friendship", "friend"),
    ("a library", "book"), ("the sun", "sun"), ("a train journey", "train"), ("dogs", "dog"),
    ("the sea shore", "sea"), ("autumn leaves", "leaves"), ("a birthday", "birthday"), ("tea", "tea"),
    ("the stars", "star"), ("a river", "river"), ("snow", "snow"), ("a kitchen", "kitchen"), ("bicycles", "bike"),
    ("the wind", "wind"), ("a market", "market"), ("summer", "summer"), ("flowers", "flower"),
    ("a school", "school"), ("the desert", "desert"), ("chocolate", "chocolate"), ("a storm", "storm"),
    ("birds", "bird"), ("the night sky", "sky"),
)
WORDS: tuple[str, ...] = ("blue", "quiet", "warm", "bright", "soft", "green", "cold", "happy", "old", "small",
                          "gold", "slow", "calm", "sweet", "wild", "clear")
FIRST_WORDS: tuple[str, ...] = ("Today", "Sometimes", "Every", "Look", "Here", "Always")
OPTIONAL = ("include", "avoid", "lowercase", "exclaim", "no_comma", "start")

_LEN = re.compile(r"in (\d+) to (\d+) words")
_SUBJ = re.compile(r"^Write about (.+?) in \d+ to")
_INCLUDE = re.compile(r'Use the word "(\w+)"')
_AVOID = re.compile(r'Do not use the word "(\w+)"')
_START = re.compile(r'Start with the word "(\w+)"')
_WORD = re.compile(r"[A-Za-z']+")
# words a cut sentence should not end on
_DANGLING = frozenset("a an the and or but of to in on at for with by from that which who is are was were its "
                      "their his her my our your as into than".split())


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


@dataclass
class ConstraintTask:
    """Prompts, rubric and simulated labeler of the constraints task.

    min_constraints / max_constraints   optional constraints per prompt (besides length and subject)
    label_noise                         std of the labeler's Gaussian noise on the gold score
    """

    min_constraints: int = 1
    max_constraints: int = 2
    label_noise: float = 0.1

    # -- prompts -----------------------------------------------------------------------------
    def prompt(self, generator: torch.Generator) -> str:
        def pick(seq):
            return seq[int(torch.randint(len(seq), (1,), generator=generator))]

        subject, _ = pick(SUBJECTS)
        lo = int(torch.randint(4, 9, (1,), generator=generator))
        hi = lo + int(torch.randint(4, 9, (1,), generator=generator))
        n = int(torch.randint(self.min_constraints, self.max_constraints + 1, (1,), generator=generator))
        kinds = [OPTIONAL[int(i)] for i in torch.randperm(len(OPTIONAL), generator=generator)[:n]]
        parts = [f"Write about {subject} in {lo} to {hi} words."]
        words = [WORDS[int(i)] for i in torch.randperm(len(WORDS), generator=generator)[:2]]
        for kind in kinds:
            if kind == "include":
                parts.append(f'Use the word "{words[0]}".')
            elif kind == "avoid":
                parts.append(f'Do not use the word "{words[1]}".')
            elif kind == "lowercase":
                parts.append("Write in lowercase only.")
            elif kind == "exclaim":
                parts.append("End with an exclamation mark.")
            elif kind == "no_comma":
                parts.append("Do not use commas.")
            elif kind == "start":
                parts.append(f'Start with the word "{pick(FIRST_WORDS)}".')
        if "lowercase" in kinds and "start" in kinds:  # "Start with Today" in lowercase: ask for it in lowercase
            parts = [p.replace(m.group(1), m.group(1).lower()) if (m := _START.search(p)) else p for p in parts]
        return " ".join(parts)

    def prompts(self, n: int, generator: torch.Generator) -> list[str]:
        return [self.prompt(generator) for _ in range(n)]

    # -- rubric ------------------------------------------------------------------------------
    @staticmethod
    def constraints(prompt: str) -> dict:
        """The constraints a prompt states, parsed from its text."""
        m = _LEN.search(prompt)
        s = _SUBJ.search(prompt)
        if m is None or s is None:
            raise ValueError(f"prompt: not a prompt of the constraints task: {prompt!r}")
        key = dict(SUBJECTS).get(s.group(1))
        if key is None:
            raise ValueError(f"prompt: unknown subject {s.group(1)!r} in {prompt!r}")
        out = {"length": (int(m.group(1)), int(m.group(2))), "subject": key}
        if (i := _INCLUDE.search(prompt)) is not None:
            out["include"] = i.group(1)
        if (a := _AVOID.search(prompt)) is not None:
            out["avoid"] = a.group(1)
        if "Write in lowercase only." in prompt:
            out["lowercase"] = True
        if "End with an exclamation mark." in prompt:
            out["exclaim"] = True
        if "Do not use commas." in prompt:
            out["no_comma"] = True
        if (st := _START.search(prompt)) is not None:
            out["start"] = st.group(1)
        return out

    def rubric(self, prompt: str, response: str) -> dict[str, float]:
        """Each constraint's score in [0, 1] for `response` to `prompt`."""
        c = self.constraints(prompt)
        text = response.strip()
        words = _words(text)
        lower = [w.lower() for w in words]
        lo, hi = c["length"]
        n = len(words)
        slack = max(1.0, (hi - lo) / 2)
        gap = lo - n if n < lo else (n - hi if n > hi else 0)
        out = {"length": max(0.0, 1.0 - gap / slack),
               "subject": float(any(w.startswith(c["subject"]) for w in lower))}
        if "include" in c:
            out["include"] = float(c["include"] in lower)
        if "avoid" in c:
            out["avoid"] = float(c["avoid"] not in lower) if n else 0.0
        if c.get("lowercase"):
            out["lowercase"] = float(bool(words) and text == text.lower())
        if c.get("exclaim"):
            out["exclaim"] = float(text.endswith("!"))
        if c.get("no_comma"):
            out["no_comma"] = float("," not in text) if n else 0.0
        if "start" in c:
            out["start"] = float(bool(words) and words[0] == c["start"])
        return out

    def gold_score(self, prompt: str, response: str) -> float:
        """The hidden gold preference: the mean constraint score, in [0, 1]."""
        r = self.rubric(prompt, response)
        return sum(r.values()) / len(r)

    def demonstration(self, prompt: str, draft: str, fix_prob: float, generator: torch.Generator) -> str:
        """`draft` edited to meet each constraint of `prompt` with probability `fix_prob` (each edit drawn
        independently from `generator`): the simulated labeler's written answer."""
        c = self.constraints(prompt)

        def fix() -> bool:
            return float(torch.rand((), generator=generator)) < fix_prob

        text = " ".join(draft.replace('"', "").split())
        lo, hi = c["length"]
        extra = int("include" in c) + int("start" in c)  # words the later edits may add
        if len(text.split()) > hi - extra and fix():
            words = text.split()
            top = max(lo, hi - extra)
            # at the end of a clause when one ends in the range, else after a word that can end a sentence
            clause = [n for n in range(lo, top + 1) if words[n - 1][-1] in ",.;:!?"]
            n = clause[-1] if clause else top
            while n > 1 and words[n - 1].lower().strip(",.;:") in _DANGLING:
                n -= 1
            text = " ".join(words[:n]).rstrip(",;:-") + "."
        if "avoid" in c and fix():
            text = " ".join(w for w in text.split() if _words(w.lower()) != [c["avoid"]])
        if "include" in c and c["include"] not in [w.lower() for w in _words(text)] and fix():
            words = text.split()
            text = " ".join(words[:-1] + [c["include"]] + words[-1:]) if words else c["include"]
        if "start" in c and fix() and (not _words(text) or _words(text)[0] != c["start"]):
            text = f"{c['start']} {text[:1].lower()}{text[1:]}"
        if c.get("no_comma") and fix():
            text = text.replace(",", "")
        if c.get("lowercase") and fix():
            text = text.lower()
        if c.get("exclaim") and fix():
            text = text.rstrip(".?!,;: ") + "!"
        return text.strip() or draft

    def gold_max(self, prompt: str) -> float:
        return 1.0

    def rank(self, prompt: str, responses: list[str], generator: torch.Generator) -> list[int]:
        """The simulated labeler: ranks (0 = best) by gold score + N(0, label_noise^2)."""
        return noisy_ranks([self.gold_score(prompt, r) for r in responses], self.label_noise, generator)


def rubric_reward(prompt: str, response: str) -> float:
    """The constraints task's rubric as a verifiable reward for ``--rule_rewards``: the gold score in [0, 1]
    (the mean of the prompt's constraint scores)."""
    return _rubric_task().gold_score(prompt, response)


@functools.lru_cache(maxsize=1)
def _rubric_task() -> ConstraintTask:
    return ConstraintTask()

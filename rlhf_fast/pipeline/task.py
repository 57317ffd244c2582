"""The embedded default task: topic-constrained answers with a hidden gold preference.

A prompt names a topic and two hint words: ``write about animals with rain cat :``. An answer is a
list of words, ended by ``.``. The hidden *gold* preference (:meth:`TopicTask.gold_score`, in [0, 1]):

    gold = 0.5 * on_topic + 0.25 * length + 0.25 * ended - 0.25 * n_banned      (clipped at 0)

    on_topic  fraction of the answer's words that belong to the prompt's topic
    length    max(0, 1 - |n_words - target_len| / target_len)
    ended     1 when the answer ends with "."
    n_banned  number of banned words ("ugh", "meh", ...) in the answer

so the best achievable score is 1.0 (``target_len`` words of the topic, then ``.``). The SFT
demonstrations are imperfect on purpose (about half the words off topic, lengths 2-10, a missing
``.`` now and then, an occasional banned word), which leaves headroom for the reward model and PPO.
The simulated labeler ranks answers by the gold score plus Gaussian noise (labelers disagree); the
reward model only ever sees those rankings. The gold scorer is used by the labeler and by evaluation,
never by training.

The tokenizer is word-level, built locally with the ``tokenizers`` library (no download) and wrapped
as a ``PreTrainedTokenizerFast``; it is saved with every model the pipeline writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOPICS: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "dog", "horse", "bird", "fish", "mouse", "lion", "goat"),
    "food": ("bread", "apple", "rice", "cheese", "soup", "cake", "pear", "egg"),
    "weather": ("rain", "snow", "wind", "sun", "cloud", "storm", "fog", "frost"),
    "sports": ("ball", "goal", "race", "team", "swim", "golf", "bike", "ski"),
    "music": ("song", "drum", "piano", "flute", "choir", "tune", "bass", "harp"),
}
BANNED = ("ugh", "meh", "whatever", "boring")
PROMPT_WORDS = ("write", "about", "with", ":")
END = "."
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def vocabulary() -> list[str]:
    """Every token of the task's tokenizer, specials first (ids are list positions)."""
    words = list(SPECIALS) + list(PROMPT_WORDS) + [END] + list(TOPICS) + list(BANNED)
    for topic_words in TOPICS.values():
        words.extend(topic_words)
    return words


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` for the task (adds ``<bos>`` in front of every text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left", model_max_length=64)


@dataclass
class TopicTask:
    """Generator, gold preference and simulated labeler of the default task.

    target_len      answer length (words before ".") the gold preference wants
    on_topic_prob   probability that a demonstration word is on topic (the rest: other topics)
    banned_prob     probability that a demonstration word is a banned word
    end_prob        probability that a demonstration ends with "."
    min_len/max_len range of demonstration lengths (uniform)
    label_noise     standard deviation of the labeler's Gaussian noise on the gold score
    """

    target_len: int = 6
    on_topic_prob: float = 0.5
    banned_prob: float = 0.08
    end_prob: float = 0.75
    min_len: int = 2
    max_len: int = 10
    label_noise: float = 0.1

    # -- generation ------------------------------------------------------------------------
    def _words(self) -> list[str]:
        return [w for ws in TOPICS.values() for w in ws]

    def prompts(self, n: int, generator: torch.Generator) -> list[str]:
        """n prompts ``write about <topic> with <hint> <hint> :`` drawn with `generator`."""
        topics, words = list(TOPICS), self._words()
        out = []
        for _ in range(n):
            t = topics[int(torch.randint(len(topics), (1,), generator=generator))]
            h = [words[int(i)] for i in torch.randint(len(words), (2,), generator=generator)]
            out.append(f"write about {t} with {h[0]} {h[1]} :")
        return out

    def demonstration(self, prompt: str, generator: torch.Generator) -> str:
        """An imperfect demonstration for `prompt` (see the module docstring)."""
        topic = self.topic_of(prompt)
        others = [w for t, ws in TOPICS.items() if t != topic for w in ws]
        n = int(torch.randint(self.min_len, self.max_len + 1, (1,), generator=generator))
        words = []
        for _ in range(n):
            u = float(torch.rand((), generator=generator))
            if u < self.banned_prob:
                pool = BANNED
            elif u < self.banned_prob + (1 - self.banned_prob) * self.on_topic_prob:
                pool = TOPICS[topic]
            else:
                pool = others
            words.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
        if float(torch.rand((), generator=generator)) < self.end_prob:
            words.append(END)
        return " ".join(words)

    def ptx_texts(self, n: int, generator: torch.Generator) -> list[dict]:
        """The default task's pretraining (ptx) set: n further demonstrations, as prompt/response pairs."""
        return [{"prompt": p, "response": self.demonstration(p, generator)} for p in self.prompts(n, generator)]

    # -- gold preference and labeler -------------------------------------------------------
    @staticmethod
    def topic_of(prompt: str) -> str:
        words = prompt.split()
        for w in words:
            if w in TOPICS:
                return w
        raise ValueError(f"prompt: no topic of the default task in {prompt!r}")

    def gold_score(self, prompt: str, response: str) -> float:
        """The hidden gold preference of `response` to `prompt`, in [0, 1] (module docstring)."""
        topic_words = set(TOPICS[self.topic_of(prompt)])
        words = response.split()
        ended = bool(words) and words[-1] == END
        words = [w for w in words if w != END]
        n = len(words)
        on_topic = sum(w in topic_words for w in words) / n if n else 0.0
        length = max(0.0, 1.0 - abs(n - self.target_len) / self.target_len)
        banned = sum(w in BANNED for w in words)
        return max(0.0, 0.5 * on_topic + 0.25 * length + 0.25 * float(ended) - 0.25 * banned)

    def best_response(self, prompt: str) -> str:
        topic = self.topic_of(prompt)
        words = [TOPICS[topic][i % len(TOPICS[topic])] for i in range(self.target_len)]
        return " ".join(words + [END])

    def gold_max(self, prompt: str) -> float:
        """Best achievable gold score for `prompt` (the score of :meth:`best_response`)."""
        return self.gold_score(prompt, self.best_response(prompt))

    def rank(self, prompt: str, responses: list[str], generator: torch.Generator) -> list[int]:
        """The simulated labeler: ranks (0 = best) of `responses` by gold score + N(0, label_noise^2)."""
        return noisy_ranks([self.gold_score(prompt, r) for r in responses], self.label_noise, generator)


def noisy_ranks(scores: list[float], noise: float, generator: torch.Generator) -> list[int]:
    """Ranks (0 = best) of answers by score + N(0, noise^2): a simulated labeler who disagrees now and then."""
    noisy = [s + noise * float(torch.randn((), generator=generator)) for s in scores]
    order = sorted(range(len(scores)), key=lambda i: -noisy[i])
    ranks = [0] * len(scores)
    for position, i in enumerate(order):
        ranks[i] = position
    return ranks


def sft_examples(task: TopicTask, n: int, generator: torch.Generator) -> list[dict]:
    """n demonstrations ``{"prompt", "response"}`` of the default task."""
    return [{"prompt": p, "response": task.demonstration(p, generator)} for p in task.prompts(n, generator)]


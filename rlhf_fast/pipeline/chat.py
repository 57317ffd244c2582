"""Token ids of prompts, answers and conversations, in the model's own chat format.

When the tokenizer has a chat template (``chat_template="auto"``, or a Jinja file given with
``--chat_template FILE``), every stage speaks it:

- a prompt is rendered with ``apply_chat_template(messages, add_generation_prompt=True)``; a plain-text
  prompt becomes one user turn (after the optional system prompt);
- an answer is its content's tokens followed by the template's end-of-turn token (``<|im_end|>`` for
  ChatML templates, ``<|eot_id|>`` for Llama 3 ...), found by rendering a probe conversation; generation
  stops at that token or at eos, so what the policy samples is what SFT taught it to write;
- a multi-turn conversation is rendered whole, and SFT's labels cover the assistant turns only (each
  through its end-of-turn token), found by rendering the conversation's prefixes.

With ``chat_template="none"`` (or a tokenizer without a template, such as the tiny preset's word-level
one) a prompt is its text with the tokenizer's special tokens and an answer ends with eos.

Padding is never decided by a pad id (pad == eos is common): masks are built from lengths.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_fast.pipeline.data import DataError

ROLES = ("system", "user", "assistant", "tool")
_PROBE = "\u2063rlhf-fast-probe\u2063"


def resolve_chat_template(tokenizer, chat_template: str | None = "auto") -> str | None:
    """The Jinja template to use: the tokenizer's own ("auto"), none ("none"), or the contents of a file
    (which is also set on the tokenizer, so that the exported models carry it)."""
    if chat_template in (None, "", "auto"):
        return getattr(tokenizer, "chat_template", None) or None
    if chat_template == "none":
        return None
    path = Path(chat_template)
    if not path.is_file():
        raise ValueError(f"chat_template: expected 'auto', 'none' or a Jinja file, got {chat_template!r} "
                         "(no such file)")
    text = path.read_text(encoding="utf-8")
    tokenizer.chat_template = text
    return text


def _check_messages(messages, where: str, what: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {what!r} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field {what!r}[{i}] must be a {{'role', 'content'}} object, "
                            f"got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: field {what!r}[{i}] has role {m.get('role')!r}; expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field {what!r}[{i}] has no string 'content'")
    return messages


def completion_text(completion, where: str = "", what: str = "completion") -> str:
    """The text of an answer given as a string or as assistant messages (their contents joined)."""
    if isinstance(completion, str):
        return completion
    msgs = _check_messages(completion, where or "answer", what)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            raise DataError(f"{where}: field {what!r}[{i}] has role {m['role']!r}; an answer holds assistant "
                            "messages only")
    return "".join(m["content"] for m in msgs)


@dataclass
class Encoder:
    """Tokenizes prompts (truncated from the left to max_prompt_len, counted in ``truncated``, with a warning
    for the first few), answers (end-of-turn token appended, cut to max_response_len) and conversations."""

    tokenizer: object
    max_prompt_len: int = 256
    max_response_len: int = 128
    chat_template: str | None = "auto"
    truncated: int = field(default=0, init=False)

    def __post_init__(self):
        if self.max_prompt_len < 1 or self.max_response_len < 1:
            raise ValueError(f"max_prompt_len/max_response_len: must be >= 1, got {self.max_prompt_len}, "
                             f"{self.max_response_len}")
        self.template = resolve_chat_template(self.tokenizer, self.chat_template)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("tokenizer: has no eos token (answers end with it)")
        self.end_of_turn = self._end_of_turn() if self.template else eos
        self.stop_ids = sorted({self.end_of_turn, eos})

    # -- rendering ---------------------------------------------------------------------------
    def _render(self, messages: list[dict], generation_prompt: bool, kwargs: dict | None = None) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                  chat_template=self.template, **(kwargs or {}))

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _end_of_turn(self) -> int:
        """The first token the template writes after an assistant message's content."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        text = self._render(probe, False)
        cut = text.rfind(_PROBE)
        tail = text[cut + len(_PROBE):] if cut >= 0 else ""
        ids = self._ids(tail.lstrip(" ")) if tail.strip() else []
        return ids[0] if ids else self.tokenizer.eos_token_id

    def messages_of(self, prompt, system: str | None = None, where: str = "", what: str = "prompt") -> list[dict]:
        """The messages of a prompt given as text (one user turn) or as messages, with `system` first."""
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
            [dict(m) for m in _check_messages(prompt, where or what, what)]
        if system and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        return msgs

    def _truncate(self, ids: list[int], where: str) -> list[int]:
        if len(ids) > self.max_prompt_len:
            self.truncated += 1
            if self.truncated <= 3:
                warnings.warn(f"{where or 'prompt'}: prompt of {len(ids)} tokens truncated to the last "
                              f"{self.max_prompt_len} (max_prompt_len)", stacklevel=3)
            ids = ids[-self.max_prompt_len:]
        return ids

    # -- public ------------------------------------------------------------------------------
    def prompt(self, prompt, where: str = "", system: str | None = None,
               template_kwargs: dict | None = None) -> list[int]:
        """Token ids of a prompt ready for the answer: the chat template with the generation prompt, or
        the plain text with the tokenizer's special tokens."""
        if self.template:
            ids = self._ids(self._render(self.messages_of(prompt, system, where), True, template_kwargs))
        else:
            text = prompt if isinstance(prompt, str) else "\n\n".join(
                m["content"] for m in self.messages_of(prompt, system, where))
            if isinstance(prompt, str) and system:
                text = system + "\n\n" + text
            ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids:
            raise DataError(f"{where or 'prompt'}: the prompt has no tokens")
        return self._truncate(ids, where)

    def response(self, completion, where: str = "") -> list[int]:
        """Token ids of an answer: its content, then the end-of-turn token, cut to max_response_len (an
        answer cut short has no end-of-turn token: it did not end there)."""
        text = completion_text(completion, where)
        ids = self._ids(text) + [self.end_of_turn]
        return ids[: self.max_response_len]

    def text(self, text: str) -> list[int]:
        """Token ids of a plain pretraining text (special tokens as the tokenizer adds them)."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def conversation(self, messages, where: str = "", system: str | None = None,
                     template_kwargs: dict | None = None) -> tuple[list[int], list[bool]]:
        """(token ids, train mask) of a whole conversation: True on the tokens of every assistant turn
        (through its end-of-turn token), False on everything else."""
        msgs = self.messages_of(messages, system, where, "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: field 'messages' has no assistant turn to train on")
        if not self.template:
            ids, mask = list(self.tokenizer("", add_special_tokens=True)["input_ids"]), []
            mask = [False] * len(ids)
            for m in msgs:
                piece = self._ids(("\n\n" if len(ids) else "") + m["content"])
                if m["role"] == "assistant":
                    piece = piece + [self.end_of_turn]
                ids += piece
                mask += [m["role"] == "assistant"] * len(piece)
            return ids, mask
        full = self._ids(self._render(msgs, False, template_kwargs))
        mask = [False] * len(full)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._ids(self._render(msgs[:i], True, template_kwargs))
            through = self._ids(self._render(msgs[: i + 1], False, template_kwargs))
            if full[: len(before)] != before or full[: len(through)] != through:
                raise DataError(f"{where}: the chat template does not render this conversation's turns as "
                                "prefixes of the whole (assistant tokens cannot be located)")
            end = len(through)
            for j in range(len(before), len(through)):  # through the end-of-turn token, not what follows it
                if through[j] == self.end_of_turn:
                    end = j + 1
                    break
            for j in range(len(before), end):
                mask[j] = True
        return full, mask

"""Data as users have it: TRL's dataset formats, from files, folders, the Hub, ``datasets`` objects or lists,
turned into the canonical rows every stage consumes. Nothing is rendered here: chat templates and tokens are
the Encoder's job.

Sources (:func:`load_examples`)
  * a path: ``.jsonl`` / ``.ndjson`` / ``.json`` (JSON lines, or one JSON array), read here so errors name
    ``file:line``; ``.parquet`` / ``.csv`` / ``.arrow`` through ``datasets`` (memory-mapped Arrow); a
    ``save_to_disk`` folder; any other folder of data files through ``datasets.load_dataset(folder)``;
  * a hub id (``datasets.load_dataset(id, name=subset, split=split)``), when a hub is reachable;
  * a ``datasets.Dataset`` / ``DatasetDict`` / ``IterableDataset``, or a list of dicts.
  ``split`` picks a split (default: "train", or the only one); ``subset`` is the dataset's config name.
  ``streaming=True`` reads a re-iterable stream (:class:`Rows`); ``lazy=True`` a random-access sequence that
  holds no row (:class:`IndexedRows`: JSONL by byte offset, Arrow memory-mapped), for data larger than memory.
  ``columns`` maps our names to the source's, e.g. ``{"prompt": "question", "completion": "answer"}``
  (CLI form ``"prompt=question,completion=answer"``, :func:`parse_columns`). Other columns are ignored.

Formats (detected from the columns, or named with ``format=``), each plain (strings) or conversational
(lists of ``{"role", "content"}`` messages; roles system / user / assistant / tool):
  language_modeling  ``text`` (plain) or ``messages`` (conversational; ``messages`` wins if both are there)
  prompt_only        ``prompt``
  prompt_completion  ``prompt`` + ``completion`` (our legacy ``response`` column is read as the completion)
  preference         ``prompt`` + ``chosen`` + ``rejected``; or implicit prompt: ``chosen`` + ``rejected``
  ranked             ``prompt`` + ``responses`` (K >= 2) + ``ranking`` (ours)
  optional columns   ``margin`` (preference: a finite number), ``system`` (a system prompt, str),
                     ``chat_template_kwargs`` (a dict handed to the chat template)
Detection: of the formats whose key column is present (``responses``/``ranking`` -> ranked,
``chosen``/``rejected`` -> preference, ``completion`` -> prompt_completion, ``messages``/``text`` ->
language_modeling, ``prompt`` -> prompt_only, in that order) the first one that fits the stage is taken,
else the first one found (and the stage refuses it). JSONL and lists are detected from their first row.

Stages take what fits them; anything else is a DataError naming the format and the stages it fits:
  sft, ptx   language_modeling, prompt_completion
  rm         preference, ranked
  ppo        the prompt of any format: prompt_only, prompt_completion, preference (implicit too), ranked,
             and conversational language_modeling (the turns before the final assistant turns)

Canonical rows (exact keys; plus ``system`` / ``chat_template_kwargs`` when given and ``_where``):
  sft, ptx   {"prompt": P, "completion": C} | {"messages": [msg, ...]} | {"text": str}
  rm         {"prompt": P, "responses": [C, ...], "ranking": [int, ...], "margin": float | None}
             ``ranking[i]`` is the rank of ``responses[i]``, 0 = best; equal ranks are a tie (no pair);
             a preference pair is ``responses=[chosen, rejected], ranking=[0, 1]``
  ppo        {"prompt": P}
  P is a str or a list of messages (system / user / assistant / tool turns before the answer), C a str or a
  list of assistant messages. ``_where`` names the source and row: ``file:line`` for JSONL, ``file[i]`` for a
  JSON array, ``split[i]`` for a ``datasets`` object, ``source split[i]`` for a file or folder read through
  ``datasets`` (``source[i]`` where the data has no split name), ``rows[i]`` for a list. Message dicts and
  chat_template_kwargs are copied (keys whose value is None dropped: Arrow fills them in); the caller's
  objects are never modified.

Rules
  * A ranking is valid when it has one int per response and its distinct values are exactly 0..m-1 for some
    m >= 2: a permutation of 0..K-1, or dense ranks with ties (e.g. [0, 1, 1, 2]). All-tied rows (no pair to
    learn from) and gaps ([0, 2, 2]) are errors.
  * Implicit prompt (``chosen`` + ``rejected`` without ``prompt``): conversational rows share their leading
    turns as the prompt (at least one; what follows must be assistant turns); plain rows share the longest
    common leading text, cut back to its last whitespace so that no word is split (the completion starts
    with that whitespace; no whitespace -> an empty prompt).
  * A completion, chosen, rejected or response that is empty (blank text, no messages, or only blank
    assistant contents) is an error; so are chosen == rejected and ``messages`` without an assistant turn.

Merging pairs (``merge_pairs=True``, rm only; the K-wise ranking loss then sees one row of K answers instead
of C(K, 2) rows of 2). Preference rows are grouped by (prompt, system, chat_template_kwargs); rows with a
margin and ranked rows are never merged. In a group, the answers are nodes and each pair an edge
chosen -> rejected (a pair given twice counts once). Each weakly connected component is merged on its own:
  * its rank of an answer is the length of the longest chain of pairs above it (0 = best);
  * it is merged only if those ranks say exactly what the pairs say under transitivity: for any two answers,
    one has the smaller rank if and only if a chain of pairs leads from it to the other, and equal ranks
    (a tie) only where no chain leads either way. E.g. a>b, b>c -> [a, b, c] ranks [0, 1, 2]; a>b, a>c ->
    ranks [0, 1, 1] (b, c tied); a>b, c>b -> [0, 1, 0];
  * otherwise the component's rows stay as they are, K = 2 each: a cycle (a>b, b>a or a>b>c>a) has no
    consistent order, and e.g. a>b>c with a>d cannot be written as ranks without inventing d>c or c>d.
  A merged row takes the place of its component's first row; its ``_where`` lists the merged rows' places.
"""

from __future__ import annotations

import json
import math
import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from rlhf_fast.pipeline.jsonl import DataError, iter_jsonl, iter_jsonl_at

STAGES = ("sft", "rm", "ppo", "ptx")
FORMATS = ("language_modeling", "prompt_only", "prompt_completion", "preference", "ranked")
ROLES = ("system", "user", "assistant", "tool")
# the formats each stage takes, in the order a "nothing detected" error suggests them
STAGE_FORMATS = {
    "sft": ("prompt_completion", "language_modeling"),
    "ptx": ("language_modeling", "prompt_completion"),
    "rm": ("preference", "ranked"),
    "ppo": ("prompt_only", "prompt_completion", "preference", "ranked", "language_modeling"),
}
# detection order and the columns that signal each format
_SIGNALS = (("ranked", ("responses", "ranking")), ("preference", ("chosen", "rejected")),
            ("prompt_completion", ("completion",)), ("language_modeling", ("messages", "text")),
            ("prompt_only", ("prompt",)))
_COLUMNS_OF = {"language_modeling": "'text' or 'messages'", "prompt_only": "'prompt'",
               "prompt_completion": "'prompt' + 'completion'",
               "preference": "'prompt' + 'chosen' + 'rejected' (or 'chosen' + 'rejected')",
               "ranked": "'prompt' + 'responses' + 'ranking'"}
_FIRST_FIELD = {"sft": "prompt", "ptx": "text", "rm": "chosen", "ppo": "prompt"}
CANONICAL_COLUMNS = ("prompt", "completion", "text", "messages", "chosen", "rejected", "responses", "ranking",
                     "margin", "system", "chat_template_kwargs")
_DATA_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")


class Rows:
    """A re-iterable stream of canonical rows (each iteration reads the source again, lazily); what
    :func:`load_examples` returns with ``streaming=True``. Bad rows raise when they are reached."""

    def __init__(self, factory: Callable[[], Iterator[dict]], where: str):
        self._factory = factory
        self.where = where

    def __iter__(self) -> Iterator[dict]:
        return self._factory()

    def __repr__(self) -> str:
        return f"Rows({self.where})"


class IndexedRows(Sequence):
    """Canonical rows read on demand: ``len``, ``rows[i]`` (the row converted when it is read) and ``rows[a:b]``
    (a view of a range), holding no row in memory; what :func:`load_examples` returns with ``lazy=True``. Rows
    come from memory-mapped Arrow data (``datasets``) or a JSONL file read at a byte offset, so a trainer that
    indexes its data (SFT, the RL stages' prompts) works on data larger than memory."""

    def __init__(self, n: int, get: Callable[[int], dict], where: str, start: int = 0):
        self._n, self._get, self.where, self._start = n, get, where, start

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(self._n)
            if step != 1:
                raise ValueError(f"rows: a view takes a step of 1, got {step}")
            return IndexedRows(max(0, stop - start), self._get, self.where, self._start + start)
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"rows: expected an int index or a slice, got {type(i).__name__}")
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"rows: index {i} out of range for {self._n} rows")
        return self._get(self._start + i)

    def __repr__(self) -> str:
        return f"IndexedRows({self.where}, {self._n} rows)"


def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """``"prompt=question,completion=answer"`` -> ``{"prompt": "question", "completion": "answer"}``
    (a dict is checked and copied; None or "" -> {})."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            ours, eq, theirs = part.partition("=")
            if not eq or not ours.strip() or not theirs.strip():
                raise ValueError(f"columns: expected 'ours=theirs' pairs separated by commas "
                                 f"(e.g. 'prompt=question,completion=answer'), got {spec!r}")
            items.append((ours.strip(), theirs.strip()))
    else:
        raise ValueError(f"columns: expected a dict or a 'prompt=question,...' string, got {type(spec).__name__}")
    out: dict[str, str] = {}
    for ours, theirs in items:
        ours = "completion" if ours == "response" else ours      # our legacy name of the completion
        if ours not in CANONICAL_COLUMNS:
            raise ValueError(f"columns: {ours!r} is not one of our columns (expected one of "
                             f"{', '.join(CANONICAL_COLUMNS)}), got {ours!r}={theirs!r}")
        if not isinstance(theirs, str) or not theirs:
            raise ValueError(f"columns: the source column for {ours!r} must be a non-empty str, got {theirs!r}")
        if ours in out:
            raise ValueError(f"columns: {ours!r} is mapped twice ({out[ours]!r} and {theirs!r})")
        out[ours] = theirs
    return out


# ---------------------------------------------------------------------------------------------
# Sources: each becomes (label, column names or None, a factory of (where, row) iterators)
# ---------------------------------------------------------------------------------------------

def _split_of(dd, split, label):
    names = list(dd.keys())
    if split is None:
        if "train" in names:
            split = "train"
        elif len(names) == 1:
            split = names[0]
        else:
            raise ValueError(f"split: {label} has the splits {', '.join(names)}; name one, got None")
    if split not in names:
        raise ValueError(f"split: {label} has the splits {', '.join(names)}, got {split!r}")
    return dd[split], split


def _dataset_source(ds, label: str | None, split: str | None):
    """A datasets (Iterable)Dataset or DatasetDict -> (label, columns, factory)."""
    import datasets

    if isinstance(ds, datasets.DatasetDict | datasets.IterableDatasetDict):
        ds, split = _split_of(ds, split, label or "the dataset")
    elif split is None and getattr(ds, "split", None) is not None:
        split = str(ds.split)
    # "source split[i]", "source[i]" (no split name), "split[i]" or "dataset[i]" (no source)
    prefix = " ".join(x for x in (label, split) if x) or "dataset"
    cols = list(ds.column_names) if ds.column_names is not None else None

    def rows():
        for i, row in enumerate(ds):
            yield f"{prefix}[{i}]", row

    if isinstance(ds, datasets.Dataset):  # memory-mapped Arrow: random access without loading it
        rows.index = lambda: (len(ds), lambda i: (f"{prefix}[{i}]", ds[i]))
    return prefix, cols, rows


def _jsonl_index(p: Path):
    """(rows, get) of a JSONL file: one pass that checks every line and keeps each object's byte offset and
    line number (16 bytes a row); get(i) reads row i back from its offset."""
    offsets, lines = array("q"), array("q")
    for _, _, offset, lineno in iter_jsonl_at(p):
        offsets.append(offset)
        lines.append(lineno)

    def get(i: int):
        with p.open("rb") as fh:
            fh.seek(offsets[i])
            return f"{p}:{lines[i]}", json.loads(fh.readline())
    return len(offsets), get


def _json_array_source(p: Path):
    def rows():
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON array of objects or JSON lines, got {type(data).__name__}")
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DataError(f"{p}[{i}]: expected a JSON object, got {type(obj).__name__}")
            yield f"{p}[{i}]", obj
    return rows


def _open(source, split, subset, streaming):
    """(label, columns or None, factory of (where, row) iterators) of any supported source."""
    if subset is not None and not (isinstance(source, str | os.PathLike) and not Path(source).is_file()):
        raise ValueError(f"subset: only a hub id or a dataset folder has subsets (configs), got {subset!r} for "
                         f"{type(source).__name__ if not isinstance(source, str | os.PathLike) else source}")
    if isinstance(source, list | tuple):
        if split not in (None, "train"):
            raise ValueError(f"split: a list of rows has one split ('train'), got {split!r}")
        rows = list(source)

        def factory():
            for i, r in enumerate(rows):
                if not isinstance(r, dict):
                    raise DataError(f"rows[{i}]: expected a dict, got {type(r).__name__}")
                yield f"rows[{i}]", r
        return "rows", None, factory
    if isinstance(source, str | os.PathLike):
        p = Path(source)
        if p.is_file():
            suffix = p.suffix.lower()
            if suffix in _JSON_SUFFIXES:
                if split not in (None, "train"):
                    raise ValueError(f"split: a JSON file has one split ('train'), got {split!r}")
                with p.open(encoding="utf-8", errors="replace") as fh:  # a sniff: bad bytes are the reader's to name
                    head = fh.read(4096).lstrip()
                if suffix == ".json" and head.startswith("["):
                    return str(p), None, _json_array_source(p)
                def jsonl_rows():
                    return iter_jsonl(p)
                jsonl_rows.index = lambda: _jsonl_index(p)
                return str(p), None, jsonl_rows
            if suffix in _DATA_SUFFIXES:
                import datasets

                ds = datasets.load_dataset(_DATA_SUFFIXES[suffix], data_files=str(p), split=split or "train",
                                           streaming=streaming)
                return _dataset_source(ds, str(p), split or "train")
            raise DataError(f"{p}: unknown file type {suffix!r} (expected one of "
                            f"{', '.join(_JSON_SUFFIXES + tuple(_DATA_SUFFIXES))})")
        if p.is_dir():
            import datasets

            if any((p / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
                if subset is not None:
                    raise ValueError(f"subset: a save_to_disk folder has no subsets (configs), got {subset!r}")
                ds = datasets.load_from_disk(str(p))       # memory-mapped Arrow
                if streaming and isinstance(ds, datasets.Dataset):
                    split = split or (str(ds.split) if ds.split is not None else None)
                    ds = ds.to_iterable_dataset()
                return _dataset_source(ds, str(p), split)
            ds = datasets.load_dataset(str(p), name=subset, split=split, streaming=streaming)
            return _dataset_source(ds, str(p), split)
        if p.suffix.lower() in _JSON_SUFFIXES + tuple(_DATA_SUFFIXES) or isinstance(source, os.PathLike):
            raise DataError(f"{p}: no such file")
        import datasets

        try:
            ds = datasets.load_dataset(str(source), name=subset, split=split, streaming=streaming)
        except (ValueError, FileNotFoundError, ConnectionError, OSError) as e:
            raise DataError(f"{source}: not a file or folder here, and loading it as a hub dataset failed "
                            f"({type(e).__name__}: {e})") from None
        return _dataset_source(ds, str(source), split)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a pipeline dependency
        datasets = None
    if datasets is not None and isinstance(source, datasets.Dataset | datasets.DatasetDict |
                                           datasets.IterableDataset | datasets.IterableDatasetDict):
        if streaming and isinstance(source, datasets.Dataset):
            split = split or (str(source.split) if source.split is not None else None)
            source = source.to_iterable_dataset()
        return _dataset_source(source, None, split)
    raise ValueError(f"source: expected a path, a hub id, a datasets.Dataset or a list of dicts, "
                     f"got {type(source).__name__}")


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

def _present(cols, colmap) -> set[str]:
    """Our column names present in the source columns `cols` (after the remapping)."""
    out = set()
    for ours in CANONICAL_COLUMNS:
        if colmap.get(ours, ours) in cols:
            out.add(ours)
    return out


def _fits(fmt: str, stage: str, ours: set[str]) -> bool:
    if fmt == "language_modeling" and stage == "ppo":
        return "messages" in ours                  # plain text has no prompt
    return fmt in STAGE_FORMATS[stage]


def _stages_of(fmt: str) -> list[str]:
    return [s for s in STAGES if fmt in STAGE_FORMATS[s]]


def _detect(ours: set[str], stage: str) -> str | None:
    found = [fmt for fmt, signals in _SIGNALS if any(s in ours for s in signals)]
    for fmt in found:
        if _fits(fmt, stage, ours):
            return fmt
    return found[0] if found else None


def _normalise_format(format: str | None) -> str | None:
    if format is None or format == "":
        return None
    if not isinstance(format, str):
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {type(format).__name__}")
    f = format.strip().lower().replace("-", "_")
    f = {"lm": "language_modeling", "text": "language_modeling", "messages": "language_modeling",
         "pairwise": "preference", "prompt": "prompt_only"}.get(f, f)
    if f not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    return f


# ---------------------------------------------------------------------------------------------
# Row conversion
# ---------------------------------------------------------------------------------------------

def _tname(v) -> str:
    return "None" if v is None else type(v).__name__


class _Row:
    """One source row seen through the column mapping, with error messages that name its place."""

    def __init__(self, where: str, raw: dict, colmap: dict[str, str]):
        self.where, self.raw, self.colmap = where, raw, colmap

    def name(self, ours: str) -> str:
        """The field as the source spells it (what the user can find in the data)."""
        return repr(self.colmap.get(ours, ours))

    def fail(self, msg: str):
        raise DataError(f"{self.where}: {msg}")

    def get(self, ours: str):
        return self.raw.get(self.colmap.get(ours, ours))

    def need(self, ours: str):
        v = self.get(ours)
        if v is None:
            present = [k for k, x in self.raw.items() if x is not None]
            self.fail(f"field {self.name(ours)} is missing; columns present: {', '.join(map(str, present)) or 'none'}")
        return v

    def kind(self, ours: str, v, index: int | None = None) -> str:
        """"plain" (str) or "conv" (a list of messages)."""
        if isinstance(v, str):
            return "plain"
        if isinstance(v, list):
            return "conv"
        field = self.name(ours) + ("" if index is None else f"[{index}]")
        self.fail(f"field {field} must be str, got {_tname(v)} (or, in a conversational row, a list of "
                  f"{{'role', 'content'}} messages)")

    def messages(self, ours: str, v: list, *, answer: bool, index: int | None = None) -> list[dict]:
        """A checked copy of a message list; `answer`: only assistant turns, not all blank."""
        field = self.name(ours) + ("" if index is None else f"[{index}]")
        out = []
        for j, m in enumerate(v):
            if not isinstance(m, dict):
                self.fail(f"field {field}[{j}] must be a {{'role', 'content'}} message, got {_tname(m)}")
            role = m.get("role")
            if role is None:
                self.fail(f"field {field}[{j}] has no 'role'")
            if role not in ROLES:
                self.fail(f"field {field}[{j}]: unknown role {role!r} (expected one of {', '.join(ROLES)})")
            content = m.get("content")
            if content is None:
                self.fail(f"field {field}[{j}] (role {role!r}) has no 'content'")
            if not isinstance(content, str):
                self.fail(f"field {field}[{j}] 'content' must be str, got {_tname(content)}")
            if answer and role != "assistant":
                self.fail(f"field {field}[{j}]: role {role!r} in an answer (expected 'assistant')")
            out.append({k: x for k, x in m.items() if x is not None})
        if answer and all(not m["content"].strip() for m in out):
            self.fail(f"field {field} is empty" + (" (no messages)" if not out else " (blank assistant content)"))
        return out

    def text(self, ours: str, v: str, *, answer: bool, index: int | None = None) -> str:
        if answer and not v.strip():
            field = self.name(ours) + ("" if index is None else f"[{index}]")
            self.fail(f"field {field} is empty")
        return v

    def value(self, ours: str, v, kind: str, *, answer: bool, index: int | None = None):
        if kind == "plain":
            return self.text(ours, v, answer=answer, index=index)
        return self.messages(ours, v, answer=answer, index=index)

    def same_kind(self, fields: list[tuple[str, object]]) -> str:
        """The kind shared by these (name, value) fields; a mixed row is an error."""
        kinds = [(f, self.kind(f.split("[")[0], v)) for f, v in fields]
        first = kinds[0][1]
        for f, k in kinds[1:]:
            if k != first:
                desc = {"plain": "str", "conv": "a message list"}
                self.fail(f"mixed plain and conversational row: field {self._label(kinds[0][0])} is "
                          f"{desc[first]}, field {self._label(f)} is {desc[k]} (give all as strings or all as "
                          f"message lists)")
        return first

    def _label(self, f: str) -> str:
        base, br, rest = f.partition("[")
        return self.name(base) + (br + rest if br else "")

    def extras(self, out: dict, prompt) -> dict:
        system = self.get("system")
        if system is not None:
            if not isinstance(system, str):
                self.fail(f"field {self.name('system')} must be str, got {_tname(system)}")
            if isinstance(prompt, list) and prompt and prompt[0]["role"] == "system":
                self.fail(f"field {self.name('system')} is given but the prompt already starts with a "
                          f"system turn")
            out["system"] = system
        kw = self.get("chat_template_kwargs")
        if kw is not None:
            if not isinstance(kw, dict):
                self.fail(f"field {self.name('chat_template_kwargs')} must be a dict, got {_tname(kw)}")
            out["chat_template_kwargs"] = {k: v for k, v in kw.items() if v is not None}
        out["_where"] = self.where
        return out

    def margin(self):
        m = self.get("margin")
        if m is None:
            return None
        if isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m):
            self.fail(f"field {self.name('margin')} must be a finite number, got {m!r}")
        return float(m)


def _prompt(r: _Row, kind: str):
    v = r.need("prompt")
    if kind == "plain":
        return v
    return r.messages("prompt", v, answer=False)


def _implicit_prompt(r: _Row, chosen, rejected, kind: str):
    """(prompt, chosen answer, rejected answer) of an implicit-prompt pair."""
    if kind == "conv":
        c = r.messages("chosen", chosen, answer=False)
        j = r.messages("rejected", rejected, answer=False)
        n = 0
        while n < min(len(c), len(j)) and c[n] == j[n]:
            n += 1
        if n == 0:
            r.fail(f"fields {r.name('chosen')} and {r.name('rejected')} share no leading turn (the implicit-prompt "
                   f"form takes their shared leading turns as the prompt)")
        for ours, full in (("chosen", c), ("rejected", j)):
            if n == len(full):
                r.fail(f"field {r.name(ours)} is empty after the {n} prompt turns it shares with the other answer")
            for t in range(n, len(full)):
                if full[t]["role"] != "assistant":
                    r.fail(f"field {r.name(ours)}[{t}]: role {full[t]['role']!r} after the shared prompt turns "
                           f"(expected 'assistant')")
            r.messages(ours, full[n:], answer=True)
        return c[:n], c[n:], j[n:]
    common = os.path.commonprefix([chosen, rejected])
    cut = max(common.rfind(ch) for ch in (" ", "\n", "\t"))
    cut = max(cut, 0)
    p, a, b = chosen[:cut], chosen[cut:], rejected[cut:]
    r.text("chosen", a, answer=True)
    r.text("rejected", b, answer=True)
    return p, a, b


def _convert(r: _Row, fmt: str, stage: str, ours: set[str]) -> dict:
    """The canonical row of `r`; `ours`: our columns present in the source (which decide, for the whole
    source, between 'messages' and 'text', and between an explicit and an implicit prompt)."""
    if fmt == "language_modeling":
        if "messages" in ours:
            v = r.need("messages")
            if not isinstance(v, list):
                r.fail(f"field {r.name('messages')} must be a list of {{'role', 'content'}} messages, "
                       f"got {_tname(v)}")
            msgs = r.messages("messages", v, answer=False)
            if stage == "ppo":
                # the prompt: every turn up to the last one that is not the assistant's
                last_user = max((i for i, m in enumerate(msgs) if m["role"] != "assistant"), default=-1)
                if last_user < 0:
                    r.fail(f"field {r.name('messages')} has no turn before the assistant's answer to use as "
                           f"the prompt")
                prompt = msgs[: last_user + 1]
                return r.extras({"prompt": prompt}, prompt)
            if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
                r.fail(f"field {r.name('messages')} has no assistant turn with content (nothing to learn from)")
            return r.extras({"messages": msgs}, msgs)
        v = r.need("text")
        if not isinstance(v, str):
            r.fail(f"field {r.name('text')} must be str, got {_tname(v)}")
        return r.extras({"text": r.text("text", v, answer=True)}, None)
    if fmt == "prompt_only":
        v = r.need("prompt")
        kind = r.kind("prompt", v)
        prompt = _prompt(r, kind)
        return r.extras({"prompt": prompt}, prompt)
    if fmt == "prompt_completion":
        p, c = r.need("prompt"), r.need("completion")
        kind = r.same_kind([("prompt", p), ("completion", c)])
        prompt = _prompt(r, kind)
        if stage == "ppo":
            return r.extras({"prompt": prompt}, prompt)
        return r.extras({"prompt": prompt, "completion": r.value("completion", c, kind, answer=True)}, prompt)
    if fmt == "preference":
        c, j = r.need("chosen"), r.need("rejected")
        if "prompt" in ours:
            kind = r.same_kind([("prompt", r.need("prompt")), ("chosen", c), ("rejected", j)])
            prompt = _prompt(r, kind)
            a = r.value("chosen", c, kind, answer=True)
            b = r.value("rejected", j, kind, answer=True)
        else:
            kind = r.same_kind([("chosen", c), ("rejected", j)])
            prompt, a, b = _implicit_prompt(r, c, j, kind)
        if stage == "ppo":
            return r.extras({"prompt": prompt}, prompt)
        if a == b:
            r.fail(f"field {r.name('chosen')} equals field {r.name('rejected')} (a pair needs two different answers)")
        return r.extras({"prompt": prompt, "responses": [a, b], "ranking": [0, 1], "margin": r.margin()}, prompt)
    # ranked
    p = r.need("prompt")
    responses = r.need("responses")
    if not isinstance(responses, list):
        r.fail(f"field {r.name('responses')} must be a list of K >= 2 answers, got {_tname(responses)}")
    k = len(responses)
    if stage != "ppo" and k < 2:
        r.fail(f"field {r.name('responses')} needs K >= 2 answers, got {k}")
    for i, a in enumerate(responses):
        r.kind("responses", a, index=i)
    kind = r.same_kind([("prompt", p)] + [(f"responses[{i}]", a) for i, a in enumerate(responses)])
    prompt = _prompt(r, kind)
    if stage == "ppo":
        return r.extras({"prompt": prompt}, prompt)
    answers = [r.value("responses", a, kind, answer=True, index=i) for i, a in enumerate(responses)]
    ranking = r.need("ranking")
    ok = (isinstance(ranking, list) and len(ranking) == k
          and all(isinstance(x, int) and not isinstance(x, bool) for x in ranking))
    distinct = sorted(set(ranking)) if ok else []
    if not ok or distinct != list(range(len(distinct))) or len(distinct) < 2:
        shown = ranking if isinstance(ranking, list) else repr(ranking)
        why = " (every response tied: no pair to learn from)" if ok and len(distinct) == 1 else ""
        r.fail(f"field {r.name('ranking')} must be a permutation of 0..{k - 1} (the rank of each response, "
               f"0 = best), or with ties dense ranks (tied responses share a rank and no rank is skipped, "
               f"e.g. [0, 1, 1, 2]), got {shown}{why}")
    return r.extras({"prompt": prompt, "responses": answers, "ranking": list(ranking), "margin": None}, prompt)


# ---------------------------------------------------------------------------------------------
# Merging preference pairs into rankings
# ---------------------------------------------------------------------------------------------

def _key(v) -> str:
    return json.dumps(v, sort_keys=True, ensure_ascii=False)


def _merge_component(edges: set[tuple[int, int]], nodes: list[int]) -> dict[int, int] | None:
    """Ranks of `nodes` if the pairs `edges` (winner, loser) say exactly a ranking with ties, else None."""
    succ = {n: [] for n in nodes}
    indeg = {n: 0 for n in nodes}
    for w, l in edges:
        succ[w].append(l)
        indeg[l] += 1
    rank = {n: 0 for n in nodes}
    ready = [n for n in nodes if indeg[n] == 0]
    seen = 0
    while ready:                                   # Kahn's order; rank = longest chain of pairs above
        n = ready.pop()
        seen += 1
        for m in succ[n]:
            rank[m] = max(rank[m], rank[n] + 1)
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    if seen != len(nodes):                         # a cycle
        return None
    for n in nodes:                                # smaller rank <=> a chain of pairs leads there
        below, stack = set(), list(succ[n])
        while stack:
            m = stack.pop()
            if m not in below:
                below.add(m)
                stack.extend(succ[m])
        if below != {m for m in nodes if rank[m] > rank[n]}:
            return None
    return rank


def merge_preference_pairs(rows: list[dict], is_pair: list[bool]) -> list[dict]:
    """Merge the preference pairs (``is_pair[i]``) of `rows` that share a prompt into rankings (rules in
    the module docstring). Returns new rows; the inputs are not modified."""
    groups: dict[str, list[int]] = {}
    for i, (row, pair) in enumerate(zip(rows, is_pair, strict=True)):
        if pair and row["margin"] is None:
            groups.setdefault(_key([row["prompt"], row.get("system"), row.get("chat_template_kwargs")]), []).append(i)
    replaced: dict[int, dict | None] = {}         # row index -> merged row (at the first) or None (absorbed)
    for members in groups.values():
        answers: dict[str, int] = {}
        values: list = []
        edge_rows: dict[tuple[int, int], list[int]] = {}
        for i in members:
            ids = []
            for a in rows[i]["responses"]:
                k = _key(a)
                if k not in answers:
                    answers[k] = len(values)
                    values.append(a)
                ids.append(answers[k])
            edge_rows.setdefault((ids[0], ids[1]), []).append(i)
        parent = list(range(len(values)))

        def find(x, parent=parent):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for w, l in edge_rows:
            parent[find(w)] = find(l)
        comps: dict[int, list[int]] = {}
        for n in range(len(values)):
            comps.setdefault(find(n), []).append(n)
        for nodes in comps.values():
            edges = {e for e in edge_rows if find(e[0]) == find(nodes[0])}
            rank = _merge_component(edges, nodes)
            if rank is None:
                continue
            src = sorted(i for e in edges for i in edge_rows[e])
            if len(src) == 1:
                continue
            first = rows[src[0]]
            merged = {"prompt": first["prompt"], "responses": [values[n] for n in nodes],
                      "ranking": [rank[n] for n in nodes], "margin": None}
            merged.update({k: first[k] for k in ("system", "chat_template_kwargs") if k in first})
            merged["_where"] = "; ".join(rows[i]["_where"] for i in src)
            replaced[src[0]] = merged
            for i in src[1:]:
                replaced[i] = None
    out = []
    for i, row in enumerate(rows):
        if i in replaced:
            if replaced[i] is not None:
                out.append(replaced[i])
        else:
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------

def load_examples(source, *, stage: str, format: str | None = None, split: str | None = None,
                  subset: str | None = None, columns: dict | str | None = None, streaming: bool = False,
                  merge_pairs: bool = False, lazy: bool = False) -> list[dict] | Rows | IndexedRows:
    """Canonical rows of `stage` ("sft" | "rm" | "ppo" | "ptx") from `source` (see the module docstring:
    sources, formats, the rows returned, the rules and how pairs merge).

    ``format`` overrides the detection; ``split`` / ``subset`` pick a split and a config of a ``datasets``
    source; ``columns`` maps our column names to the source's (a dict or ``"prompt=question,..."``);
    ``streaming=True`` returns a re-iterable :class:`Rows` read lazily (files through
    ``datasets.load_dataset(..., streaming=True)``, Arrow data memory-mapped) instead of a list;
    ``merge_pairs=True`` (rm only) merges preference pairs that share a prompt into rankings;
    ``lazy=True`` returns an :class:`IndexedRows` (``len``, random access, views) that holds no row: a JSONL
    file is read at each row's byte offset, Arrow data (Parquet / CSV / Arrow files, ``save_to_disk`` folders,
    a ``datasets.Dataset``) stays memory-mapped; every row is read and checked once at load. For data larger
    than memory; a list of rows (already in memory) is returned as a list.
    Bad data raises :class:`DataError` naming the source, the row and the field.
    """
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {', '.join(STAGES)}, got {stage!r}")
    fmt_given = _normalise_format(format)
    colmap = parse_columns(columns)
    if merge_pairs and stage != "rm":
        raise ValueError(f"merge_pairs: only the rm stage merges preference pairs, got stage {stage!r}")
    if merge_pairs and (streaming or lazy):
        raise ValueError("merge_pairs: merging needs every row at once, so it cannot stream or read lazily; got "
                         f"streaming={streaming}, lazy={lazy}")
    if streaming and lazy:
        raise ValueError("lazy: random access (lazy=True) and a stream (streaming=True) exclude each other")
    label, cols, factory = _open(source, split, subset, streaming)

    def setup(first_where: str, first_row: dict | None):
        present_cols = cols if cols is not None else [k for k, v in (first_row or {}).items() if v is not None]
        for ours, theirs in colmap.items():
            if theirs not in present_cols:
                raise DataError(f"{first_where}: columns maps {ours!r} to {theirs!r}, which is not a column; "
                                f"columns present: {', '.join(map(str, present_cols)) or 'none'}")
        cm = dict(colmap)
        if "completion" not in cm and "completion" not in present_cols and "response" in present_cols:
            cm["completion"] = "response"          # our legacy SFT / ptx column
        ours = _present(present_cols, cm)
        fmt = fmt_given or _detect(ours, stage)
        if fmt is None:
            want = "; ".join(f"{_COLUMNS_OF[f]} ({f})" for f in STAGE_FORMATS[stage])
            missing = colmap.get(_FIRST_FIELD[stage], _FIRST_FIELD[stage])
            raise DataError(f"{first_where}: field {missing!r} is missing ({stage} data takes {want}); "
                            f"columns present: {', '.join(map(str, present_cols)) or 'none'}")
        if fmt == "language_modeling" and stage == "ppo" and "messages" not in ours:
            raise DataError(f"{label}: the {fmt} format (plain 'text', no prompt) does not fit the ppo stage; it "
                            f"fits sft, ptx (ppo takes {', '.join(STAGE_FORMATS['ppo'][:-1])} or conversational "
                            f"'messages')")
        if not _fits(fmt, stage, ours):
            raise DataError(f"{label}: the {fmt} format ({_COLUMNS_OF[fmt]}) does not fit the {stage} stage; "
                            f"it fits {', '.join(_stages_of(fmt))} ({stage} takes {', '.join(STAGE_FORMATS[stage])})")
        return fmt, cm, ours

    def stream() -> Iterator[tuple[dict, bool]]:
        it = iter(factory())
        try:
            where, raw = next(it)
        except StopIteration:
            raise DataError(f"{label}: no rows") from None
        fmt, cm, ours = setup(where, raw)
        while True:
            if not isinstance(raw, dict):
                raise DataError(f"{where}: expected a dict, got {_tname(raw)}")
            yield _convert(_Row(where, raw, cm), fmt, stage, ours), fmt == "preference"
            try:
                where, raw = next(it)
            except StopIteration:
                return

    if streaming:
        return Rows(lambda: (row for row, _ in stream()), label)
    if lazy and not isinstance(source, list | tuple):
        index = getattr(factory, "index", None)
        if index is None:
            raise ValueError(f"lazy: {label} has no random access (a JSON array or an iterable dataset); read it "
                             "with streaming=True, or as a list")
        for _ in stream():                      # every row checked once, none kept
            pass
        n, get = index()
        where0, raw0 = get(0)
        fmt, cm, ours = setup(where0, raw0)
        return IndexedRows(n, lambda i: _convert(_Row(*get(i), cm), fmt, stage, ours), label)
    pairs = list(stream())
    rows = [row for row, _ in pairs]
    if merge_pairs:
        rows = merge_preference_pairs(rows, [p for _, p in pairs])
    return rows


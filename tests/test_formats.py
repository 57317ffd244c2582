"""TRL's dataset formats through rlhf_fast.pipeline.formats: every format, plain and conversational, from
JSONL / JSON / Parquet / CSV / Arrow / save_to_disk folders / script-free dataset folders / datasets objects /
lists; column remapping; merging of preference pairs; and errors that name the source, row and field."""

from __future__ import annotations

import copy
import json
import re

import pytest

datasets = pytest.importorskip("datasets")

from rlhf_fast.pipeline.data import DataError, load_prompts, load_ptx, load_ranked, load_sft  # noqa: E402
from rlhf_fast.pipeline.formats import (  # noqa: E402
    IndexedRows,
    Rows,
    load_examples,
    merge_preference_pairs,
    parse_columns,
)


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


SYS = {"role": "system", "content": "be brief"}

# name -> (source row, {stage: canonical row without _where}); every stage not listed refuses the format
CASES = {
    "lm_plain": ({"text": "the sky is blue ."},
                 {"sft": {"text": "the sky is blue ."}, "ptx": {"text": "the sky is blue ."}}),
    "lm_conv": ({"messages": [SYS, U("sky?"), A("blue"), U("why?"), A("light")]},
                {"sft": {"messages": [SYS, U("sky?"), A("blue"), U("why?"), A("light")]},
                 "ptx": {"messages": [SYS, U("sky?"), A("blue"), U("why?"), A("light")]},
                 "ppo": {"prompt": [SYS, U("sky?"), A("blue"), U("why?")]}}),
    "prompt_only_plain": ({"prompt": "sky?"}, {"ppo": {"prompt": "sky?"}}),
    "prompt_only_conv": ({"prompt": [SYS, U("sky?")]}, {"ppo": {"prompt": [SYS, U("sky?")]}}),
    "pc_plain": ({"prompt": "sky?", "completion": " blue"},
                 {"sft": {"prompt": "sky?", "completion": " blue"}, "ptx": {"prompt": "sky?", "completion": " blue"},
                  "ppo": {"prompt": "sky?"}}),
    "pc_conv": ({"prompt": [U("sky?")], "completion": [A("blue")]},
                {"sft": {"prompt": [U("sky?")], "completion": [A("blue")]},
                 "ptx": {"prompt": [U("sky?")], "completion": [A("blue")]}, "ppo": {"prompt": [U("sky?")]}}),
    "pref_plain": ({"prompt": "sky?", "chosen": " blue", "rejected": " green"},
                   {"rm": {"prompt": "sky?", "responses": [" blue", " green"], "ranking": [0, 1], "margin": None},
                    "ppo": {"prompt": "sky?"}}),
    "pref_conv": ({"prompt": [U("sky?")], "chosen": [A("blue")], "rejected": [A("green")]},
                  {"rm": {"prompt": [U("sky?")], "responses": [[A("blue")], [A("green")]], "ranking": [0, 1],
                          "margin": None}, "ppo": {"prompt": [U("sky?")]}}),
    "implicit_plain": ({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: black"},
                       {"rm": {"prompt": "Q: sky? A:", "responses": [" blue", " black"], "ranking": [0, 1],
                               "margin": None}, "ppo": {"prompt": "Q: sky? A:"}}),
    "implicit_conv": ({"chosen": [SYS, U("sky?"), A("blue")], "rejected": [SYS, U("sky?"), A("green")]},
                      {"rm": {"prompt": [SYS, U("sky?")], "responses": [[A("blue")], [A("green")]],
                              "ranking": [0, 1], "margin": None}, "ppo": {"prompt": [SYS, U("sky?")]}}),
    "ranked_plain": ({"prompt": "sky?", "responses": ["blue", "red", "green"], "ranking": [0, 2, 1]},
                     {"rm": {"prompt": "sky?", "responses": ["blue", "red", "green"], "ranking": [0, 2, 1],
                             "margin": None}, "ppo": {"prompt": "sky?"}}),
    "ranked_conv": ({"prompt": [U("sky?")], "responses": [[A("blue")], [A("red")], [A("teal")], [A("x")]],
                     "ranking": [0, 1, 1, 2]},
                    {"rm": {"prompt": [U("sky?")], "responses": [[A("blue")], [A("red")], [A("teal")], [A("x")]],
                            "ranking": [0, 1, 1, 2], "margin": None}, "ppo": {"prompt": [U("sky?")]}}),
}
FORMAT_OF = {"lm": "language_modeling", "prompt_only": "prompt_only", "pc": "prompt_completion",
             "pref": "preference", "implicit": "preference", "ranked": "ranked"}


def write_source(kind, tmp_path, rows):
    """(source, where of row i) for the rows written as `kind`."""
    if kind == "list":
        return rows, lambda i: f"rows[{i}]"
    if kind == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))   # a blank first line: lines count
        return p, lambda i: f"{p}:{i + 2}"
    if kind == "json_array":
        p = tmp_path / "d.json"
        p.write_text(json.dumps(rows, indent=1))
        return p, lambda i: f"{p}[{i}]"
    ds = datasets.Dataset.from_list(rows)
    if kind == "dataset":
        return ds, lambda i: f"dataset[{i}]"
    if kind == "dataset_dict":
        return datasets.DatasetDict({"test": ds.select([0]), "train": ds}), lambda i: f"train[{i}]"
    if kind == "parquet":
        p = tmp_path / "d.parquet"
        ds.to_parquet(str(p))
        return p, lambda i: f"{p} train[{i}]"
    if kind == "csv":
        p = tmp_path / "d.csv"
        ds.to_csv(str(p), index=False)
        return p, lambda i: f"{p} train[{i}]"
    if kind == "save_to_disk":
        p = tmp_path / "saved"
        ds.save_to_disk(str(p))
        return p, lambda i: f"{p}[{i}]"
    if kind == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        (p,) = (tmp_path / "saved").glob("*.arrow")
        return p, lambda i: f"{p} train[{i}]"
    if kind == "folder":                     # a script-free dataset folder: what load_dataset(hub id) reads
        d = tmp_path / "folder"
        d.mkdir()
        (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d, lambda i: f"{d} train[{i}]"
    raise AssertionError(kind)


KINDS = ["list", "jsonl", "json_array", "dataset", "dataset_dict", "parquet", "csv", "save_to_disk", "arrow",
         "folder"]


def strip(rows):
    return [{k: v for k, v in r.items() if k != "_where"} for r in rows]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_format_from_every_source(tmp_path, kind, case):
    if kind == "csv" and case.endswith("_conv") or kind == "csv" and case.startswith("ranked"):
        pytest.skip("CSV holds plain strings only")
    row, expected = CASES[case]
    rows = [row, copy.deepcopy(row)]
    source, where = write_source(kind, tmp_path, rows)
    for stage in ("sft", "rm", "ppo", "ptx"):
        if stage in expected:
            got = load_examples(source, stage=stage)
            assert strip(got) == [expected[stage]] * 2, (stage, got)
            assert [r["_where"] for r in got] == [where(0), where(1)]
        else:
            fmt = FORMAT_OF[case.rsplit("_", 1)[0]]
            with pytest.raises(DataError, match=rf"the {fmt} format .* does not fit the {stage} stage; it fits "):
                load_examples(source, stage=stage)


def test_streaming_rows_are_lazy_and_reiterable(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(5)]
    for kind in ("jsonl", "parquet", "dataset", "save_to_disk"):
        d = tmp_path / kind
        d.mkdir()
        source, where = write_source(kind, d, rows)
        stream = load_examples(source, stage="sft", streaming=True)
        assert isinstance(stream, Rows)
        first = list(stream)
        assert strip(first) == rows and list(stream) == first
        assert first[3]["_where"] == where(3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "p", "completion": ""}) + "\n")
    stream = load_examples(bad, stage="sft", streaming=True)           # lazy: the bad row raises when reached
    it = iter(stream)
    assert next(it)["prompt"] == "p0"
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}:2: field 'completion' is empty"):
        next(it)
    with pytest.raises(ValueError, match="merge_pairs: merging needs every row"):
        load_examples(bad, stage="rm", streaming=True, merge_pairs=True)


def test_script_free_folder_with_subsets_and_splits(tmp_path):
    d = tmp_path / "hub_like"
    d.mkdir()
    (d / "README.md").write_text("---\nconfigs:\n"
                                 "- config_name: qa\n  data_files:\n"
                                 "  - split: train\n    path: qa.jsonl\n  - split: test\n    path: qa_test.jsonl\n"
                                 "- config_name: pairs\n  data_files: pairs.jsonl\n---\n")
    (d / "qa.jsonl").write_text(json.dumps({"question": "q", "answer": " a"}) + "\n")
    (d / "qa_test.jsonl").write_text(json.dumps({"question": "tq", "answer": " ta"}) + "\n")
    (d / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": " y", "rejected": " n"}) + "\n")
    cols = "prompt=question,completion=answer"
    got = load_sft(d, subset="qa", columns=cols, legacy_response=False)
    assert strip(got) == [{"prompt": "q", "completion": " a"}] and got[0]["_where"] == f"{d} train[0]"
    got = load_sft(d, subset="qa", split="test", columns=cols, legacy_response=False)
    assert strip(got) == [{"prompt": "tq", "completion": " ta"}] and got[0]["_where"] == f"{d} test[0]"
    assert strip(load_ranked(d, subset="pairs")) == [{"prompt": "p", "responses": [" y", " n"], "ranking": [0, 1],
                                                       "margin": None}]
    two = datasets.DatasetDict({"a": datasets.Dataset.from_list([{"prompt": "x"}]),
                                "b": datasets.Dataset.from_list([{"prompt": "y"}])})
    with pytest.raises(ValueError, match="split: the dataset has the splits a, b; name one, got None"):
        load_prompts(two)
    with pytest.raises(ValueError, match="split: the dataset has the splits a, b, got 'c'"):
        load_prompts(two, split="c")
    assert strip(load_prompts(two, split="b")) == [{"prompt": "y"}]


def test_hub_id_path_reports_a_clear_error_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"no-such-owner/no-such-set: not a file or folder here, and loading it "
                                        r"as a hub dataset failed"):
        load_examples("no-such-owner/no-such-set", stage="sft")
    with pytest.raises(DataError, match=r"missing\.parquet: no such file"):
        load_examples("missing.parquet", stage="sft")


def test_legacy_jsonl_and_the_response_alias(tmp_path):
    p = tmp_path / "sft.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": " b"}) + "\n")
    rows = load_sft(p)
    assert rows == [{"prompt": "a", "completion": " b", "_where": f"{p}:1", "response": " b"}]
    assert load_sft(p, legacy_response=False) == [{"prompt": "a", "completion": " b", "_where": f"{p}:1"}]
    assert [r["response"] for r in load_ptx(p, streaming=True)] == [" b"]
    conv = [{"prompt": [U("a")], "completion": [A("b")]}]
    assert "response" not in load_sft(conv)[0]          # the alias is for plain text only


def test_column_remapping(tmp_path):
    rows = [{"question": "q", "answer": " a", "id": 7}]
    for cols in ({"prompt": "question", "completion": "answer"}, "prompt=question, completion=answer"):
        assert strip(load_examples(rows, stage="sft", columns=cols)) == [{"prompt": "q", "completion": " a"}]
    src, _ = write_source("parquet", tmp_path, [{"q": "p", "good": " y", "bad": " n", "sys": "s"}])
    got = load_examples(src, stage="rm", columns="prompt=q,chosen=good,rejected=bad,system=sys")
    assert strip(got) == [{"prompt": "p", "responses": [" y", " n"], "ranking": [0, 1], "margin": None,
                           "system": "s"}]
    with pytest.raises(DataError, match=r"rows\[0\]: columns maps 'completion' to 'reply', which is not a column; "
                                        r"columns present: question, answer, id"):
        load_examples(rows, stage="sft", columns={"prompt": "question", "completion": "reply"})
    with pytest.raises(DataError, match=r"rows\[1\]: field 'answer' is empty"):
        load_examples(rows + [{"question": "q", "answer": "  "}], stage="sft", columns="prompt=question,"
                      "completion=answer")
    assert parse_columns("prompt=question") == {"prompt": "question"} and parse_columns(None) == {}
    assert parse_columns("response=answer") == {"completion": "answer"}       # our legacy name
    with pytest.raises(ValueError, match=r"columns: expected 'ours=theirs' pairs .* got 'prompt'"):
        parse_columns("prompt")
    with pytest.raises(ValueError, match=r"columns: 'question' is not one of our columns"):
        parse_columns({"question": "prompt"})
    with pytest.raises(ValueError, match=r"columns: 'prompt' is mapped twice \('a' and 'b'\)"):
        parse_columns("prompt=a,prompt=b")


def test_detection_prefers_what_fits_the_stage_and_format_overrides():
    # an ultrafeedback-like row: a preference pair and its conversation
    row = {"prompt": "sky?", "chosen": [U("sky?"), A("blue")], "rejected": [U("sky?"), A("red")],
           "messages": [U("sky?"), A("blue")]}
    assert strip(load_examples([row], stage="sft")) == [{"messages": [U("sky?"), A("blue")]}]
    rm = load_examples([{k: v for k, v in row.items() if k != "prompt"}], stage="rm")
    assert strip(rm) == [{"prompt": [U("sky?")], "responses": [[A("blue")], [A("red")]], "ranking": [0, 1],
                          "margin": None}]
    assert strip(load_examples([row], stage="ppo", format="prompt_only")) == [{"prompt": "sky?"}]
    with pytest.raises(DataError, match=r"the preference format .* does not fit the sft stage; it fits rm, ppo"):
        load_examples([row], stage="sft", format="preference")
    with pytest.raises(ValueError, match=r"format: expected one of language_modeling, .*, got 'pairs'"):
        load_examples([row], stage="sft", format="pairs")
    with pytest.raises(ValueError, match=r"stage: expected one of sft, rm, ppo, ptx, got 'dpo'"):
        load_examples([row], stage="dpo")
    with pytest.raises(DataError, match=r"rows\[0\]: field 'text' is missing \(ptx data takes 'text' or 'messages' "
                                        r"\(language_modeling\).*columns present: txt"):
        load_examples([{"txt": "x"}], stage="ptx")


def test_a_stray_text_column_does_not_hide_the_prompt_from_ppo():
    assert strip(load_examples([{"prompt": "p", "text": "notes"}], stage="ppo")) == [{"prompt": "p"}]
    with pytest.raises(DataError, match=r"rows: the language_modeling format \(plain 'text', no prompt\) does not "
                                        r"fit the ppo stage; it fits sft, ptx"):
        load_examples([{"text": "t"}], stage="ppo")


def test_subset_and_split_only_where_they_mean_something(tmp_path):
    with pytest.raises(ValueError, match=r"subset: only a hub id or a dataset folder has subsets .* got 'x' for list"):
        load_examples([{"text": "t"}], stage="sft", subset="x")
    with pytest.raises(ValueError, match=r"split: a list of rows has one split \('train'\), got 'test'"):
        load_examples([{"text": "t"}], stage="sft", split="test")
    src, _ = write_source("parquet", tmp_path, [{"text": "t"}])
    with pytest.raises(ValueError, match=r"subset: only a hub id or a dataset folder has subsets"):
        load_examples(src, stage="sft", subset="x")


def test_optional_columns_system_kwargs_margin():
    rows = [{"prompt": "p", "chosen": " y", "rejected": " n", "margin": 2, "system": "be kind",
             "chat_template_kwargs": {"enable_thinking": False}}]
    got = load_examples(rows, stage="rm")
    assert strip(got) == [{"prompt": "p", "responses": [" y", " n"], "ranking": [0, 1], "margin": 2.0,
                           "system": "be kind", "chat_template_kwargs": {"enable_thinking": False}}]
    assert got[0]["chat_template_kwargs"] is not rows[0]["chat_template_kwargs"]
    # Arrow gives every row every key of a struct column, None where a row had none
    src = datasets.Dataset.from_list([{"text": "a", "chat_template_kwargs": {"x": 1}},
                                      {"text": "b", "chat_template_kwargs": {"y": True}}])
    assert [r["chat_template_kwargs"] for r in load_examples(src, stage="sft")] == [{"x": 1}, {"y": True}]
    with pytest.raises(DataError, match=r"rows\[0\]: field 'margin' must be a finite number, got inf"):
        load_examples([dict(rows[0], margin=float("inf"))], stage="rm")
    with pytest.raises(DataError, match=r"rows\[0\]: field 'system' is given but the prompt already starts with a "
                                        r"system turn"):
        load_examples([{"prompt": [SYS, U("x")], "system": "s"}], stage="ppo")
    with pytest.raises(DataError, match=r"rows\[0\]: field 'chat_template_kwargs' must be a dict, got str"):
        load_examples([{"text": "t", "chat_template_kwargs": "x"}], stage="ptx")


def test_inputs_are_not_modified():
    rows = [{"prompt": [U("p")], "chosen": [A("y")], "rejected": [A("n")]},
            {"prompt": [U("p")], "chosen": [A("n")], "rejected": [A("z")]},
            {"messages": [U("p"), {"role": "assistant", "content": "y", "tool_calls": None}]}]
    before = copy.deepcopy(rows)
    out = load_examples(rows[:2], stage="rm", merge_pairs=True)
    lm = load_examples(rows[2:], stage="sft")
    assert rows == before
    assert out[0]["prompt"] is not rows[0]["prompt"] and out[0]["prompt"][0] is not rows[0]["prompt"][0]
    assert lm[0]["messages"][1] == A("y")                 # Arrow's None-filled keys are dropped


def test_implicit_prompt_plain_cuts_at_a_word_boundary():
    got = load_examples([{"chosen": "Q: 2+2? A: four", "rejected": "Q: 2+2? A: five"},
                         {"chosen": "cat", "rejected": "dog"}], stage="rm")
    assert [(r["prompt"], r["responses"]) for r in got] == [("Q: 2+2? A:", [" four", " five"]),
                                                             ("", ["cat", "dog"])]


# ---------------------------------------------------------------------------------------------
# Merging pairs
# ---------------------------------------------------------------------------------------------

def pairs(prompt, *edges, margin=None):
    return [{"prompt": prompt, "chosen": w, "rejected": l, **({} if margin is None else {"margin": margin})}
            for w, l in edges]


def merged(rows):
    return [(r["prompt"], r["responses"], r["ranking"]) for r in load_examples(rows, stage="rm", merge_pairs=True)]


def test_merge_consistent_pairs_into_one_ranking():
    rows = pairs("p", ("a", "b"), ("b", "c")) + pairs("q", ("x", "y")) + pairs("p", ("a", "c"), ("a", "b"))
    out = load_examples(rows, stage="rm", merge_pairs=True)
    assert [(r["prompt"], r["responses"], r["ranking"]) for r in out] == [("p", ["a", "b", "c"], [0, 1, 2]),
                                                                         ("q", ["x", "y"], [0, 1])]
    assert out[0]["_where"] == "rows[0]; rows[1]; rows[3]; rows[4]" and out[1]["_where"] == "rows[2]"
    # without merging: one K = 2 row per pair
    assert [r["ranking"] for r in load_examples(rows, stage="rm")] == [[0, 1]] * 5


def test_merge_ties_where_neither_is_above_the_other():
    assert merged(pairs("p", ("a", "b"), ("a", "c"))) == [("p", ["a", "b", "c"], [0, 1, 1])]
    assert merged(pairs("p", ("a", "c"), ("b", "c"))) == [("p", ["a", "c", "b"], [0, 1, 0])]
    # a > {b, c} > d: the diamond is a ranking with a tie in the middle
    assert merged(pairs("p", ("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"))) == \
        [("p", ["a", "b", "c", "d"], [0, 1, 1, 2])]


def test_merge_keeps_cycles_and_non_rankings_as_pairs():
    cycle = pairs("p", ("a", "b"), ("b", "c"), ("c", "a"))
    assert merged(cycle) == [("p", ["a", "b"], [0, 1]), ("p", ["b", "c"], [0, 1]), ("p", ["c", "a"], [0, 1])]
    assert merged(pairs("p", ("a", "b"), ("b", "a"))) == [("p", ["a", "b"], [0, 1]), ("p", ["b", "a"], [0, 1])]
    # a > b > c and a > d: d is neither above nor below c, yet ranks would order them -> left as pairs
    assert merged(pairs("p", ("a", "b"), ("b", "c"), ("a", "d"))) == \
        [("p", ["a", "b"], [0, 1]), ("p", ["b", "c"], [0, 1]), ("p", ["a", "d"], [0, 1])]
    # two unconnected pairs of a prompt are two rankings, not one (a > b says nothing about d)
    assert merged(pairs("p", ("a", "b"), ("c", "d"))) == [("p", ["a", "b"], [0, 1]), ("p", ["c", "d"], [0, 1])]
    # a cycle in one component does not stop another component from merging
    assert merged(pairs("p", ("a", "b"), ("b", "a"), ("x", "y"), ("y", "z"))) == \
        [("p", ["a", "b"], [0, 1]), ("p", ["b", "a"], [0, 1]), ("p", ["x", "y", "z"], [0, 1, 2])]


def test_merge_leaves_margins_ranked_rows_and_other_prompts_alone():
    rows = pairs("p", ("a", "b"), ("b", "c"), margin=1.0) + pairs("p2", ("a", "b")) + pairs("p", ("a", "b"))
    rows.append({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]})
    with pytest.raises(DataError):                      # ranked and preference rows do not mix in one source
        load_examples(rows, stage="rm", merge_pairs=True)
    out = load_examples(rows[:-1], stage="rm", merge_pairs=True)
    assert [(r["prompt"], r["responses"], r["margin"]) for r in out] == \
        [("p", ["a", "b"], 1.0), ("p", ["b", "c"], 1.0), ("p2", ["a", "b"], None), ("p", ["a", "b"], None)]
    # the same prompt with another system prompt is another group
    sysrows = [dict(r, system="s1") for r in pairs("p", ("a", "b"))] + [dict(r, system="s2") for r in
                                                                         pairs("p", ("b", "c"))]
    assert len(load_examples(sysrows, stage="rm", merge_pairs=True)) == 2
    # conversational answers merge by value
    conv = [{"prompt": [U("p")], "chosen": [A(w)], "rejected": [A(l)]} for w, l in (("a", "b"), ("b", "c"))]
    assert merged(conv) == [([U("p")], [[A("a")], [A("b")], [A("c")]], [0, 1, 2])]
    with pytest.raises(ValueError, match="merge_pairs: only the rm stage"):
        load_examples(rows, stage="sft", merge_pairs=True)


def test_merge_preference_pairs_direct():
    rows = [{"prompt": "p", "responses": [w, l], "ranking": [0, 1], "margin": None, "_where": f"r{i}"}
            for i, (w, l) in enumerate((("a", "b"), ("a", "b"), ("b", "c")))]
    out = merge_preference_pairs(rows, [True, True, True])
    assert out == [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 2], "margin": None,
                    "_where": "r0; r1; r2"}]
    assert merge_preference_pairs(rows, [False, False, False]) == rows


# ---------------------------------------------------------------------------------------------
# Errors name the source, the row and the field
# ---------------------------------------------------------------------------------------------

GOOD = {"sft": {"prompt": [U("p")], "completion": [A("c")]}, "rm": {"prompt": "p", "chosen": "y", "rejected": "n"},
        "ptx": {"text": "t"}}
ERRORS = [
    ("sft", {"prompt": [{"role": "bot", "content": "p"}], "completion": [A("c")]},
     r"field 'prompt'\[0\]: unknown role 'bot' \(expected one of system, user, assistant, tool\)"),
    ("sft", {"prompt": [{"content": "p"}], "completion": [A("c")]}, r"field 'prompt'\[0\] has no 'role'"),
    ("sft", {"prompt": [U("p")], "completion": [{"role": "assistant"}]},
     r"field 'completion'\[0\] \(role 'assistant'\) has no 'content'"),
    ("sft", {"prompt": [U("p")], "completion": [A(" ")]}, r"field 'completion' is empty \(blank assistant content\)"),
    ("sft", {"prompt": [U("p")], "completion": []}, r"field 'completion' is empty \(no messages\)"),
    ("sft", {"prompt": [U("p")], "completion": [U("c")]},
     r"field 'completion'\[0\]: role 'user' in an answer \(expected 'assistant'\)"),
    ("sft", {"prompt": "p", "completion": [A("c")]},
     r"mixed plain and conversational row: field 'prompt' is str, field 'completion' is a message list"),
    ("sft", {"prompt": [U("p")]}, r"field 'completion' is missing; columns present: prompt"),
    ("sft", {"messages": [U("p"), U("q")]}, r"field 'messages' has no assistant turn with content"),
    ("sft", {"prompt": [U("p")], "completion": [A("c"), 3]},
     r"field 'completion'\[1\] must be a \{'role', 'content'\} message, got int"),
    ("rm", {"prompt": "p", "chosen": "", "rejected": "n"}, r"field 'chosen' is empty"),
    ("rm", {"prompt": "p", "chosen": "y", "rejected": "y"}, r"field 'chosen' equals field 'rejected'"),
    ("rm", {"prompt": "p", "chosen": "y", "rejected": ["n"]},
     r"mixed plain and conversational row: field 'prompt' is str, field 'rejected' is a message list"),
    ("rm", {"prompt": "p", "chosen": "y"}, r"field 'rejected' is missing; columns present: prompt, chosen"),
    # the source has a prompt column: a row without one is an error, not an implicit-prompt pair
    ("rm", {"chosen": "p y", "rejected": "p n"}, r"field 'prompt' is missing; columns present: chosen, rejected"),
    ("ptx", {"prompt": "p"}, r"field 'text' is missing; columns present: prompt"),
    ("rm", {"prompt": "p", "chosen": "y", "rejected": "n", "margin": "big"},
     r"field 'margin' must be a finite number, got 'big'"),
]
RANKED_ERRORS = [
    ({"prompt": "p", "responses": ["a"], "ranking": [0]}, r"field 'responses' needs K >= 2 answers, got 1"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 2, 2]},
     r"field 'ranking' must be a permutation of 0..2 .*dense ranks.*got \[0, 2, 2\]"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, r"every response tied: no pair to learn from"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1, 2]}, r"field 'ranking' must be .* got \[0, 1, 2\]"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]}, r"field 'ranking' must be a permutation"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": "0,1"}, r"field 'ranking' must be .* got '0,1'"),
    ({"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}, r"field 'responses'\[1\] is empty"),
    ({"prompt": [U("p")], "responses": [[A("a")], "b"], "ranking": [0, 1]},
     r"mixed plain and conversational row: field 'prompt' is a message list, field 'responses'\[1\] is str"),
    ({"prompt": "p", "responses": "ab", "ranking": [0, 1]}, r"field 'responses' must be a list of K >= 2 answers"),
]


# rows that Arrow cannot store next to a good row (a column mixing str and list, ints and bools, ...)
NOT_ARROW = {r"field 'completion'\[1\] must be a \{'role', 'content'\} message, got int",
             r"mixed plain and conversational row: field 'prompt' is str, field 'completion' is a message list",
             r"mixed plain and conversational row: field 'prompt' is str, field 'rejected' is a message list",
             r"field 'margin' must be a finite number, got 'big'",
             r"field 'ranking' must be a permutation", r"field 'ranking' must be .* got '0,1'",
             r"mixed plain and conversational row: field 'prompt' is a message list, field 'responses'\[1\] is str",
             r"field 'responses' must be a list of K >= 2 answers",
             r"field 'text' is missing; columns present: prompt"}  # from_list keeps the first row's columns


@pytest.mark.parametrize("kind", ["jsonl", "dataset"])
@pytest.mark.parametrize("stage, bad, message", ERRORS + [("rm", b, m) for b, m in RANKED_ERRORS])
def test_bad_rows_name_source_row_and_field(tmp_path, kind, stage, bad, message):
    if kind == "dataset" and message in NOT_ARROW:
        pytest.skip("Arrow cannot store this row next to a good one")
    if "responses" in bad:
        plain = isinstance(bad["prompt"], str)
        good = {"prompt": bad["prompt"], "responses": ["x", "y"] if plain else [[A("x")], [A("y")]], "ranking": [0, 1]}
    else:
        good = {"messages": [U("p"), A("c")]} if "messages" in bad else GOOD[stage]
    source, where = write_source(kind, tmp_path, [good, bad])
    with pytest.raises(DataError) as e:
        load_examples(source, stage=stage)
    assert str(e.value).startswith(f"{where(1)}: "), str(e.value)
    assert re.search(message, str(e.value)), str(e.value)


def test_bad_rows_in_parquet_and_csv_name_file_split_and_index(tmp_path):
    src, where = write_source("parquet", tmp_path, [{"messages": [U("a"), A("b")]},
                                                    {"messages": [U("a"), {"role": "robot", "content": "b"}]}])
    with pytest.raises(DataError, match=rf"^{re.escape(where(1))}: field 'messages'\[1\]: unknown role 'robot'"):
        load_sft(src)
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,chosen,rejected\np,y,n\nq,,n\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(csv))} train\[1\]: field 'chosen' is missing; "
                                        r"columns present: prompt, rejected"):
        load_ranked(csv)


def test_legacy_jsonl_errors_are_kept(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join([json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]}),
                            json.dumps({"prompt": 3, "responses": ["a", "b"], "ranking": [0, 1]})]) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}:2: field 'prompt' must be str, got int"):
        load_ranked(p)
    p.write_text("")
    with pytest.raises(DataError, match=r"r\.jsonl: the file is empty"):
        load_sft(p)
    q = tmp_path / "x.txt"
    q.write_text("hello")
    with pytest.raises(DataError, match=r"x\.txt: unknown file type '\.txt'"):
        load_sft(q)
    with pytest.raises(DataError, match=r"rows: no rows"):
        load_sft([])
    with pytest.raises(DataError, match=r"rows\[1\]: expected a dict, got str"):
        load_sft([{"text": "a"}, "b"])


def test_implicit_prompt_errors():
    with pytest.raises(DataError, match=r"rows\[0\]: fields 'chosen' and 'rejected' share no leading turn"):
        load_examples([{"chosen": [U("a"), A("b")], "rejected": [U("x"), A("y")]}], stage="rm")
    with pytest.raises(DataError, match=r"rows\[0\]: field 'rejected'\[2\]: role 'user' after the shared prompt"):
        load_examples([{"chosen": [U("a"), A("b")], "rejected": [U("a"), A("c"), U("d")]}], stage="rm")
    with pytest.raises(DataError, match=r"rows\[0\]: field 'chosen' is empty after the 2 prompt turns"):
        load_examples([{"chosen": [U("a"), A("b")], "rejected": [U("a"), A("b"), A("c")]}], stage="rm")


def test_loaders_take_the_config_options(tmp_path):
    src, _ = write_source("parquet", tmp_path, [{"q": "p", "a": " c", "b": " d"}])
    assert strip(load_sft(src, columns="prompt=q,completion=a")) == [{"prompt": "p", "completion": " c",
                                                                      "response": " c"}]
    assert strip(load_ptx(src, format="prompt_completion", columns={"prompt": "q", "completion": "b"},
                          split="train", legacy_response=False)) == [{"prompt": "p", "completion": " d"}]
    assert strip(load_prompts(src, columns="prompt=q")) == [{"prompt": "p"}]
    assert strip(load_ranked(src, columns="prompt=q,chosen=a,rejected=b", merge_pairs=True)) == \
        [{"prompt": "p", "responses": [" c", " d"], "ranking": [0, 1], "margin": None}]
    with pytest.raises(ValueError, match=r"split: a JSON file has one split \('train'\), got 'test'"):
        p = tmp_path / "x.jsonl"
        p.write_text('{"text": "t"}\n')
        load_ptx(p, split="test")


def test_todays_trainer_encoders_take_plain_rows_of_any_source(tmp_path):
    """The SFT / RM / PPO encoders read plain rows loaded from Parquet in TRL's formats."""
    pytest.importorskip("transformers")
    from rlhf_fast.pipeline.chat import Encoder
    from rlhf_fast.pipeline.reward import encode_ranked
    from rlhf_fast.pipeline.sft import encode_lm
    from rlhf_fast.pipeline.task import build_tokenizer

    enc = Encoder(build_tokenizer(), 16, 8)
    sft_src, _ = write_source("parquet", tmp_path, [{"prompt": "write about food :", "completion": "bread ."},
                                                    {"prompt": "write about music :", "completion": "drum"}])
    batch = encode_lm(enc, load_sft(sft_src))
    ref = encode_lm(enc, [{"prompt": "write about food :", "response": "bread ."},
                          {"prompt": "write about music :", "response": "drum"}])
    assert batch.input_ids.equal(ref.input_ids) and batch.labels.equal(ref.labels)
    d = tmp_path / "rm"
    d.mkdir()
    rm_src, _ = write_source("parquet", d, [{"prompt": "write about food :", "chosen": "bread .", "rejected": "drum"},
                                            {"prompt": "write about food :", "chosen": "drum", "rejected": "cat"}])
    (p, answers, ranks), = encode_ranked(enc, load_ranked(rm_src, merge_pairs=True))
    assert ranks == [0, 1, 2] and answers == [enc.response("bread ."), enc.response("drum"), enc.response("cat")]
    assert [enc.prompt(r["prompt"]) for r in load_prompts(rm_src)] == [p, p]


def closure(edges):
    reach = {(w, l) for w, l in edges}
    while True:
        more = {(a, d) for a, b in reach for c, d in reach if b == c} - reach
        if not more:
            return reach
        reach |= more


def test_merge_says_exactly_what_the_pairs_imply_on_random_pair_sets():
    import random

    rng = random.Random(0)
    merged_some = kept_some = 0
    for _ in range(300):
        letters = "abcdef"[: rng.randint(2, 6)]
        edges = []
        for _ in range(rng.randint(1, 7)):
            w, l = rng.sample(letters, 2)
            edges.append((w, l))
        out = load_examples(pairs("p", *edges), stage="rm", merge_pairs=True)
        covered = []
        for row in out:
            if row["_where"].count(";") == 0 and len(row["responses"]) == 2:       # a row as given
                covered.append(tuple(row["responses"]))
                kept_some += 1
                continue
            merged_some += 1
            nodes, ranks = row["responses"], row["ranking"]
            mine = [e for e in edges if e[0] in nodes and e[1] in nodes]
            implied = {(a, b) for a, ra in zip(nodes, ranks, strict=True)
                       for b, rb in zip(nodes, ranks, strict=True) if ra < rb}
            assert implied == closure(mine), (edges, row)
            assert sorted(set(ranks)) == list(range(len(set(ranks))))
            covered.extend(mine)
        assert sorted(set(covered)) == sorted(set(edges)), (edges, out)            # no pair lost
    assert merged_some > 50 and kept_some > 50


# ---------------------------------------------------------------------------------------------
# Rows read on demand (lazy=True): data larger than memory
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["jsonl", "dataset", "dataset_dict", "parquet", "csv", "save_to_disk", "arrow",
                                  "folder"])
@pytest.mark.parametrize("case", ["pc_plain", "pref_conv", "lm_conv", "ranked_plain"])
def test_lazy_rows_equal_the_list_from_every_source(tmp_path, kind, case):
    if kind == "csv" and (case.endswith("_conv") or case.startswith("ranked")):
        pytest.skip("CSV holds plain strings only")
    row, expected = CASES[case]
    rows = [row, copy.deepcopy(row), copy.deepcopy(row)]
    source, where = write_source(kind, tmp_path, rows)
    for stage in expected:
        eager = load_examples(source, stage=stage)
        lazy = load_examples(source, stage=stage, lazy=True)
        assert isinstance(lazy, IndexedRows) and len(lazy) == 3
        assert [lazy[i] for i in range(3)] == eager and lazy[-1] == eager[-1]
        view = lazy[1:]
        assert len(view) == 2 and view[0] == eager[1] and view[1]["_where"] == where(2)
        assert len(lazy[:0]) == 0 and list(lazy[1:2]) == eager[1:2]
        with pytest.raises(IndexError):
            lazy[3]


def test_lazy_rows_are_checked_at_load_and_name_the_row(tmp_path):
    good = {"prompt": "p", "completion": " c"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n\n" + json.dumps({"prompt": "p", "completion": ""}) + "\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(bad))}:3: field 'completion' is empty"):
        load_examples(bad, stage="sft", lazy=True)
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(json.dumps(good).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(broken))}:2: not UTF-8 text"):
        load_examples(broken, stage="sft", lazy=True)
    rows = [good, good]
    assert load_examples(rows, stage="sft", lazy=True) == load_examples(rows, stage="sft")  # in memory already
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="lazy: .* has no random access"):
        load_examples(arr, stage="sft", lazy=True)
    with pytest.raises(ValueError, match="lazy: random access .* and a stream"):
        load_examples(bad, stage="sft", lazy=True, streaming=True)
    with pytest.raises(ValueError, match="merge_pairs: merging needs every row at once"):
        load_examples(bad, stage="rm", lazy=True, merge_pairs=True)


def test_lazy_rows_hold_no_row(tmp_path):
    """20000 rows of ~300 bytes: the list holds them (~14 MB of Python objects), the lazy rows hold two
    int64 per row for a JSONL file and nothing for Arrow data."""
    import tracemalloc

    import datasets

    rows = [{"prompt": f"question {i} " + "word " * 20, "completion": f" answer {i} " + "text " * 30}
            for i in range(20000)]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "big"))
    held = {}
    for name, source, lazy in (("list", path, False), ("jsonl", path, True), ("arrow", tmp_path / "big", True)):
        tracemalloc.start()
        got = load_examples(source, stage="sft", lazy=lazy)
        held[name] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(got) == 20000 and got[12345]["prompt"] == rows[12345]["prompt"]
        del got
    assert held["list"] > 10e6 and held["jsonl"] < 0.4e6 and held["arrow"] < 0.1e6, held

"""The constraints task (the embedded default for a real chat model): prompts, rubric, simulated labeler and
the simulated demonstrator's edits."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.pipeline.constraints import ConstraintTask

P = 'Write about the ocean in 4 to 8 words. Use the word "blue". Write in lowercase only. End with an exclamation mark.'


def test_prompts_parse_and_every_constraint_is_scored():
    task = ConstraintTask(min_constraints=1, max_constraints=4)
    g = torch.Generator().manual_seed(0)
    prompts = task.prompts(200, g)
    kinds = set()
    for p in prompts:
        c = task.constraints(p)
        lo, hi = c["length"]
        assert 4 <= lo < hi
        kinds |= set(c)
        assert set(task.rubric(p, "some answer")) == set(c)
    assert kinds == {"length", "subject", "include", "avoid", "lowercase", "exclaim", "no_comma", "start"}
    with pytest.raises(ValueError, match="prompt"):
        task.constraints("Tell me a story.")


def test_rubric_scores_each_constraint():
    task = ConstraintTask()
    assert task.gold_score(P, "the blue ocean sings softly tonight!") == 1.0
    r = task.rubric(P, "The Blue Ocean sings.")  # upper case, no '!', 4 words: in range
    assert r == {"length": 1.0, "subject": 1.0, "include": 1.0, "lowercase": 0.0, "exclaim": 0.0}
    # two words short of the range (slack 2): half the length score; an empty answer scores nothing
    assert task.rubric(P, "ocean blue!")["length"] == 0.0
    assert task.rubric(P, "the ocean blue!")["length"] == pytest.approx(0.5)
    assert task.gold_score(P, "") == 0.0
    long = "the ocean is wide and blue and deep and cold!"  # 10 words: 2 over, slack 2
    assert task.rubric(P, long)["length"] == 0.0


def test_labeler_ranks_by_gold_without_noise():
    task = ConstraintTask(label_noise=0.0)
    answers = ["The ocean.", "the blue ocean sings softly tonight!", "the blue ocean sings softly."]
    ranks = task.rank(P, answers, torch.Generator().manual_seed(0))
    assert ranks == [2, 0, 1]


def test_demonstrator_edits_drafts_to_meet_the_constraints():
    task = ConstraintTask(min_constraints=2, max_constraints=4)
    g = torch.Generator().manual_seed(1)
    prompts = task.prompts(100, g)
    draft = "The Ocean, with its endless waves and salty breeze, is a calm and quiet world of wonder."
    drafts = [draft.replace("Ocean", task.constraints(p)["subject"].capitalize()) for p in prompts]
    before = [task.gold_score(p, d) for p, d in zip(prompts, drafts, strict=True)]
    fixed = [task.demonstration(p, d, 1.0, g) for p, d in zip(prompts, drafts, strict=True)]
    after = [task.gold_score(p, d) for p, d in zip(prompts, fixed, strict=True)]
    assert sum(after) / len(after) > 0.9 > sum(before) / len(before) + 0.3
    for p, d in zip(prompts, fixed, strict=True):
        c, r = task.constraints(p), task.rubric(p, d)
        for kind in ("include", "avoid", "lowercase", "exclaim", "no_comma", "start"):
            if kind in c:
                assert r[kind] == 1.0, (p, d, kind)
    # fix_prob 0: the draft as it is; in between: some edits, drawn from the generator
    assert [task.demonstration(p, d, 0.0, g) for p, d in zip(prompts, drafts, strict=True)] == \
        [" ".join(d.split()) for d in drafts]
    half = [task.gold_score(p, task.demonstration(p, d, 0.5, g)) for p, d in zip(prompts, drafts, strict=True)]
    assert sum(before) < sum(half) < sum(after)

"""Few-shot exemplars (MLLMU-Bench's eval.py): which profiles' solved questions precede each query.

eval.py draws exemplar profiles among a split's own people, per task, and prefixes every multiple-choice
and cloze query with their questions and answers; the drawn people are then not evaluated on that task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.benchmarks import EvalItems, Layout
from pipeline.evaluation.protocols import FEW_SHOT_ROLES, EvalProtocol


@dataclass(frozen=True)
class Exemplars:
    """One split's exemplars: the profiles drawn per task, where their questions come from, how many."""

    ids: dict[str, list[str]] = field(default_factory=dict)  # task -> exemplar person ids
    pool: EvalItems | None = None  # none: asked zero-shot
    questions: int | None = None  # at most this many exemplar questions (a seeded choice); none: all
    seed: int = 0
    images: int | None = None  # at most this many exemplar images per prompt (the first ones); none: all


@dataclass(frozen=True)
class FewShotPlan:
    """The exemplars of every evaluated role, and the counts meta.json records."""

    profiles: dict[str, int]  # task -> exemplar profiles
    questions: int | None  # at most this many exemplar questions per query; none: all
    pool: EvalItems | None
    ids: dict[str, dict[str, list[str]]]  # role -> task -> exemplar person ids
    seed: int
    images: int | None = None  # at most this many exemplar images per prompt; none: all

    def exemplars(self, role: str) -> Exemplars:
        return Exemplars(self.ids[role], self.pool, self.questions, self.seed, self.images)


def exemplar_pool(data: Layout, names: dict[str, str]) -> EvalItems:
    """Where few-shot exemplars come from: Full_Set, as eval.py does (original images and questions).

    Without a Full_Set folder, the forget and retain folders hold the same rows of those people.
    """
    if (data.root / "Full_Set").is_dir():
        return data.eval_items("full")
    pool = EvalItems(split="exemplars")
    for role in ("forget", "retain"):
        role_items = data.eval_items(names[role])
        pool.classification += role_items.classification
        pool.cloze += role_items.cloze
    return pool


def few_shot_plan(
    protocol: EvalProtocol,
    family_name: str,
    data: Layout,
    items: dict[str, EvalItems],
    names: dict[str, str],
    *,
    mc_profiles: int | None,
    cloze_profiles: int | None,
    questions: int | None,
    seed: int,
    images: int | None = None,
) -> FewShotPlan:
    """The exemplars of each role of `items` (role -> its items, in evaluation order). Profile counts,
    `questions` (0: all) and `images` (exemplar images per prompt) override the protocol's where given."""
    chosen = {"classification": mc_profiles, "cloze": cloze_profiles}
    counts = {
        task: count if count is not None else protocol.few_shot_profiles(family_name, task)
        for task, count in chosen.items()
    }
    questions = (questions or None) if questions is not None else protocol.few_shot_questions
    images = images if images is not None else protocol.max_exemplar_images
    if not data.has_exemplars:  # CLEAR and local files: no exemplar profiles, asked zero-shot
        counts = dict.fromkeys(counts, 0)
    pool = None
    if max(counts.values()) > 0 and any(role in FEW_SHOT_ROLES for role in items):
        pool = exemplar_pool(data, names)
    few_shot: dict[str, dict[str, list[str]]] = {}
    for role in items:
        few_shot[role] = {}
        if role not in FEW_SHOT_ROLES or max(counts.values()) <= 0:
            continue
        # eval.py draws exemplar profiles among the split's ids (the forget ids for the test split).
        ids = items[role].person_ids()
        for task, count in counts.items():
            drawn = min(count, len(ids) - 1)  # keep at least one profile to evaluate
            few_shot[role][task] = (
                protocol.few_shot_ids(ids, drawn, seed, names[role], task) if drawn > 0 else []
            )
    return FewShotPlan(counts, questions, pool, few_shot, seed, images)

"""Stage `evaluate`: MLLMU-Bench's metrics for a model (+ optional LoRA adapter), per split.

For each split role (forget, test = the forget people through other images, retain, real) the stage
asks every classification, cloze and generation question of the data set, greedily and in batches,
and scores the replies with pipeline.evaluation.metrics:

    mc_acc / text_mc_acc        multiple choice with / without the image
    cloze_acc / text_cloze_acc  fill in the blank
    rougeL, bleu / text_*       free generation against the reference sentence
    coherence / text_coherence  P(fluent) of the generated answers (the papers' GIB)
    rec                         the person is named in answers to questions that ask for the name

and, with the reverse attack on (Vgid App. A.3.7), the same metrics under `forget_reverse` and
`test_reverse` with the paper's reverse prompt appended to every question.

Two protocols (docs/evaluation.md, pipeline.evaluation.protocols): `official` rebuilds MLLMU-Bench's
eval.py prompts verbatim; `fixed` (default) asks the same task texts in the model family's own chat format.

Outputs next to --out: metrics.json ({split: {metric: value}, "meta": {protocol, coherence_scorer}},
readable by `dvc metrics show/diff`), meta.json (everything needed to reproduce the run),
responses.jsonl (every prompt, reply and score) and token_probs.json (one forget answer token by token,
for the report's token plot: pipeline.evaluation.token_probabilities).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.benchmarks import DataError, EvalItems, Layout
from pipeline.evaluation.answering import AnswerSettings, answer_questions, check_option_tokenization
from pipeline.evaluation.few_shot import FewShotPlan, few_shot_plan
from pipeline.evaluation.generation_journal import GenerationJournals, reply_inputs
from pipeline.evaluation.membership import membership_aucs, scored_answers
from pipeline.evaluation.metrics import build_coherence_scorer
from pipeline.evaluation.outputs import finished_metrics, write_outputs, write_token_probs
from pipeline.evaluation.prompt_length import check_prompt_lengths
from pipeline.evaluation.protocols import PROTOCOLS, REVERSE_PROMPT, EvalProtocol
from pipeline.evaluation.questions import ImageCache, Question, QuestionOptions, build_questions
from pipeline.evaluation.relearning import heldout_people
from pipeline.evaluation.scoring import aggregate
from pipeline.evaluation.shared_base import SharedBase
from pipeline.evaluation.token_probabilities import reference_images, token_probabilities, token_sample
from pipeline.journal import Journal
from pipeline.models.adapters import merged
from pipeline.samples import QASample
from stages.config import EvaluateConfig

__all__ = ["EvaluateConfig", "SharedBase", "run"]

# Options the replies do not depend on: left out of the resume key.
UNKEYED_OPTIONS = ("progress", "shard_index", "num_shards", "references", "token_sample_index")
HELDOUT_SPLITS = ("forget_heldout", "forget_relearned")


@dataclass(frozen=True)
class Inputs:
    """Everything an evaluation reads besides the model, from one layout of --data (read and checked
    before the model loads, so bad input fails fast)."""

    config: EvaluateConfig  # its split roles resolved (none given: the layout's)
    data: Layout
    names: dict[str, str]  # role -> split name
    items: dict[str, EvalItems]  # role -> its questions
    membership: tuple[list[QASample], list[QASample]] | None  # (members, never-seen) QA
    heldout: EvalItems | None  # the forget people --relearned did not relearn on
    token_sample: QASample | None  # token_probs.json's forget answer
    references: list[Image.Image]  # the people pool's images H(R_i) averages over


@dataclass
class Asked:
    """The questions of one evaluation: the evaluated model's, the relearned adapter's, the split order,
    and the few-shot exemplars they were prefixed with."""

    questions: list[Question]
    relearned: list[Question]
    splits: list[str]
    plan: FewShotPlan


def run(config: EvaluateConfig, base: SharedBase | None = None) -> dict[str, Any]:
    """Evaluate and write metrics.json, meta.json, responses.jsonl and token_probs.json; returns the metrics.

    With --relearned, the forget people it did not relearn on are asked twice more: `forget_heldout` is
    this model on them, `forget_relearned` the adapter after the relearning attack.
    """
    import torch

    started = time.time()
    protocol = PROTOCOLS[config.protocol]()
    inputs = read_inputs(config)  # every input read and checked before the model loads
    config = inputs.config
    torch.manual_seed(config.seed)
    shared = base or SharedBase()
    loaded, model = shared.model_for(config.model, config.loading(), config.adapter)
    asked = ask(config, inputs, protocol, loaded.family)
    # every prompt fits the model's context before anything is asked or written
    longest = check_prompt_lengths(
        loaded, asked.questions + asked.relearned, config.max_new_tokens, config.mc_scoring
    )
    check_option_tokenization(loaded, asked.questions + asked.relearned, config.mc_scoring)
    journals = generation_journals(config, inputs, loaded)
    if config.shard_index is not None:
        return answer_shard(config, shared, protocol, journals, asked)
    finished = finished_metrics(Path(config.out), journals.key(asked.questions))
    if finished is not None:  # a run that completed with exactly these inputs (the same resume key)
        journals.path("generation").unlink(missing_ok=True)
        write_token_probs_of(config, inputs, loaded, model)
        return finished
    journals.check_shards({"generation": asked.questions, "relearned": asked.relearned})
    journal = answer(config, loaded, model, protocol, journals, asked.questions, "generation")
    metrics: dict[str, Any] = {}
    if inputs.membership is not None:  # before --relearned's adapter joins the model
        metrics["mia"] = membership_aucs(
            *(scored_answers(loaded, model, side, config.batch_size) for side in inputs.membership)
        )
    tokens = token_table(config, inputs, loaded, model)  # the evaluated model's, as MIA's
    relearned = answer_relearned(config, shared, protocol, journals, asked.relearned)
    if relearned is not None:
        relearned.remove()
    questions = asked.questions + asked.relearned
    scorer_name, counts = score(inputs, questions, asked.splits, metrics)
    metrics["meta"] = {
        "protocol": protocol.name,
        "coherence_scorer": scorer_name,
        "mc_scoring": config.mc_scoring,
    }
    meta = run_meta(config, inputs, loaded, protocol.name, scorer_name, asked.plan, counts)
    meta.update(seconds=round(time.time() - started, 1), resume_key=journal.key)
    meta["longest_prompt"] = asdict(longest) if longest is not None else None
    write_outputs(Path(config.out), metrics, meta, questions, tokens)
    journal.remove()
    for name in ("generation", "relearned"):
        journals.remove_shards(name)
    return metrics


def answer_shard(
    config: EvaluateConfig,
    shared: SharedBase,
    protocol: EvalProtocol,
    journals: GenerationJournals,
    asked: Asked,
) -> dict[str, Any]:
    """Shard i of N: its share of the generated batches, journaled beside --out for the merging run
    (`--num-shards N` without --shard-index), which scores every question as one process would."""
    if not 0 <= config.shard_index < config.num_shards:
        raise ValueError(f"--shard-index {config.shard_index} is outside 0..{config.num_shards - 1}")
    journal = answer(config, shared.loaded, shared.model, protocol, journals, asked.questions, "generation")
    relearned = answer_relearned(config, shared, protocol, journals, asked.relearned)
    batches = len(journal.done) + (len(relearned.done) if relearned is not None else 0)
    return {"shard_index": config.shard_index, "num_shards": config.num_shards, "batches": batches}


def answer(
    config: EvaluateConfig,
    loaded,
    model,
    protocol: EvalProtocol,
    journals: GenerationJournals,
    questions: list[Question],
    name: str,
) -> Journal:
    """Answer `questions` with `model` through journal `name`: a shard generates its batches into its own
    journal; the merging (or only) run takes in the shards' batches first and scores every reply."""
    journal = journals.open(questions, name, config.shard_index)
    shard = None if config.shard_index is None else (config.shard_index, config.num_shards)
    if shard is None:
        journals.absorb_shards(journal, name)
    settings = AnswerSettings(config.max_new_tokens, config.batch_size, config.mc_scoring, config.progress)
    with merged(model, config.merge_adapter) as answering:  # the adapter is back for MIA and the token plot
        answer_questions(loaded, answering, protocol, questions, journal, settings, shard)
    return journal


def answer_relearned(
    config: EvaluateConfig,
    shared: SharedBase,
    protocol: EvalProtocol,
    journals: GenerationJournals,
    questions: list[Question],
) -> Journal | None:
    """--relearned's questions (the held-out people) asked of the adapter after the relearning attack,
    made the active one, through their own journal; None without them."""
    if not questions:
        return None
    model = shared.relearned(config.relearned)
    return answer(config, shared.loaded, model, protocol, journals, questions, "relearned")


# ------------------------------------------------------------------------------------------ setup


def read_inputs(config: EvaluateConfig) -> Inputs:
    """The data of an evaluation, its layout built once: every role checked to have questions, then
    membership inference's splits, --relearned's held-out people and the token plot's sample."""
    data = config.layout()
    config = replace(config, splits=tuple(config.splits) or data.roles)
    unknown = set(config.splits) - set(data.roles)
    if unknown:
        raise ValueError(
            f"unknown split roles {sorted(unknown)} for {data.name} data; choose from {data.roles}"
        )
    names = config.split_names(data)
    items = {role: data.eval_items(names[role]) for role in config.splits}
    for role, role_items in items.items():
        if not len(role_items):
            raise DataError(f"split {names[role]} under {config.data} has no evaluation questions")
    training = config.training_layout() if config.train_data else data  # where the forget QA is
    membership = membership_samples(config, training)
    heldout = heldout_items(config, items)
    sample = token_sample(training, config.forget_split, config.token_sample_index)
    references = reference_images(config.references, config.data)
    return Inputs(config, data, names, items, membership, heldout, sample, references)


def membership_samples(
    config: EvaluateConfig, training: Layout
) -> tuple[list[QASample], list[QASample]] | None:
    """Membership inference's two sides: the forget split's QA (members) and the never-seen split's."""
    if not config.mia_nonmembers:
        return None
    members = training.unlearning_samples(config.forget_split, ("qa",))
    try:
        nonmembers = training.unlearning_samples(config.mia_nonmembers, ("qa",))
    except DataError as error:
        raise DataError(f"{error} (--mia-nonmembers none skips membership inference)") from None
    return members, nonmembers


def heldout_items(config: EvaluateConfig, items: dict[str, EvalItems]) -> EvalItems | None:
    """The forget items of the people --relearned did not relearn on (none without --relearned)."""
    if not config.relearned:
        return None
    if "forget" not in config.splits:
        raise ValueError("--relearned scores forget people: keep `forget` in --splits")
    people = heldout_people(
        config.relearned, config.forget_split, items["forget"].person_ids(), config.adapter
    )
    return items["forget"].of_people(set(people))


def ask(config: EvaluateConfig, inputs: Inputs, protocol: EvalProtocol, family) -> Asked:
    """Every role's questions (then the reverse attack's, then the held-out people's), each image decoded
    once; with --relearned, the held-out people's questions again for the relearned adapter."""
    plan = few_shot_plan(
        protocol, family.name, inputs.data, inputs.items, inputs.names,
        mc_profiles=config.mc_few_shot_profiles, cloze_profiles=config.cloze_few_shot_profiles,
        questions=config.few_shot_questions, seed=config.seed, images=config.max_exemplar_images,
    )  # fmt: skip
    options = QuestionOptions(protocol, family, config.limit, config.instruction, config.mc_scoring)
    images = ImageCache()

    def questions_of(split: str, items: EvalItems, role: str, reverse: bool = False) -> list[Question]:
        return build_questions(items, split, options, plan.exemplars(role), images, reverse)

    runs = [(role, role, False) for role in config.splits]
    if config.reverse_attack:
        runs += [
            (f"{role}_reverse", role, True) for role in inputs.data.reverse_roles if role in config.splits
        ]
    questions = [
        q for split, role, reverse in runs for q in questions_of(split, inputs.items[role], role, reverse)
    ]
    splits = [split for split, _, _ in runs]
    if inputs.heldout is None:
        return Asked(questions, [], splits, plan)
    questions += questions_of("forget_heldout", inputs.heldout, "forget")
    relearned = questions_of("forget_relearned", inputs.heldout, "forget")
    return Asked(questions, relearned, [*splits, *HELDOUT_SPLITS], plan)


def generation_journals(config: EvaluateConfig, inputs: Inputs, loaded) -> GenerationJournals:
    """The journals beside --out, keyed by the settings the replies depend on, the model and its tokenizer,
    the adapters, every data file the evaluation reads (membership inference's from --train-data) and the
    coherence scorer's files."""
    read = [inputs.names[role] for role in config.splits] + [config.forget_split]
    files = {file for split in read for file in inputs.data.split_files(split)}
    training = config.training_layout() if config.train_data else inputs.data
    membership = [config.forget_split, config.mia_nonmembers] if config.mia_nonmembers else []
    files |= {file for split in membership for file in training.split_files(split)}
    if config.gib_model and Path(config.gib_model).is_dir():
        files |= {file for file in Path(config.gib_model).rglob("*") if file.is_file()}
    settings = {key: value for key, value in asdict(config).items() if key not in UNKEYED_OPTIONS}
    models = {"model": loaded.model_fingerprint, "tokenizer": loaded.tokenizer_fingerprint}
    keyed = reply_inputs(settings, models, config.adapter, config.relearned, sorted(files))
    return GenerationJournals(Path(config.out).parent, keyed, config.num_shards)


# ------------------------------------------------------------------------------------------ results


def score(
    inputs: Inputs, questions: list[Question], splits: list[str], metrics: dict[str, Any]
) -> tuple[str, dict[str, dict[str, int]]]:
    """Coherence of every generated answer, then each split's averages into `metrics`; returns the
    coherence scorer's name and the questions counted per split and measure."""
    references = [
        text
        for role, role_items in inputs.items.items()
        for text in inputs.data.fluent_texts(inputs.names[role], role_items)
    ]
    scorer = build_coherence_scorer(references, inputs.config.gib_model)
    answers = [question for question in questions if question.item.task == "generation"]
    for question, coherence in zip(answers, scorer([q.reply for q in answers]), strict=True):
        question.scores["coherence"] = coherence
    counts: dict[str, dict[str, int]] = {}
    for split in splits:
        metrics[split], counts[split] = aggregate([q for q in questions if q.split == split])
    return scorer.name, counts


def token_table(config: EvaluateConfig, inputs: Inputs, loaded, model) -> dict[str, Any] | None:
    """token_probs.json's content under `model` (its adapter's p(y_i), the full model's H(R_i)); None
    when the forget split has no image question. Inference only: no state or random draw changes."""
    if inputs.token_sample is None:
        print(f"evaluate: {config.forget_split} has no image question; no token_probs.json", file=sys.stderr)
        return None
    table = token_probabilities(loaded, model, inputs.token_sample, inputs.references, config.batch_size)
    return asdict(table)


def write_token_probs_of(config: EvaluateConfig, inputs: Inputs, loaded, model) -> None:
    """token_probs.json beside a completed run's metrics.json (its sample index or pool may have changed)."""
    table = token_table(config, inputs, loaded, model)
    if table is not None:
        write_token_probs(Path(config.out).parent, table)


def run_meta(
    config: EvaluateConfig,
    inputs: Inputs,
    loaded,
    protocol: str,
    scorer: str,
    plan: FewShotPlan,
    counts: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """What a run was scored with, for meta.json (its seconds and resume key follow)."""
    return {
        "config": asdict(config),
        "protocol": protocol,
        "coherence_scorer": scorer,
        "model_fingerprint": loaded.model_fingerprint,
        "tokenizer_fingerprint": loaded.tokenizer_fingerprint,
        "model_family": loaded.family.name,
        "split_names": {role: inputs.names[role] for role in config.splits},
        "reverse_prompt": REVERSE_PROMPT if config.reverse_attack else None,
        "heldout_people": inputs.heldout.person_ids() if inputs.heldout is not None else None,
        "few_shot_profiles": plan.profiles,
        "few_shot_ids": plan.ids,
        "few_shot_questions": plan.questions,
        "max_exemplar_images": plan.images,
        "counts": counts,
    }

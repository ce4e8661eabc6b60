"""The evaluate stage: metrics.json from a tiny model end to end, both protocols' prompts, bad input."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import build_random_tiny_llava
from PIL import Image

from pipeline.benchmarks import DataError
from pipeline.benchmarks.mllmu import load_eval_items, load_unlearning_samples, split_names
from pipeline.evaluation.few_shot import Exemplars
from pipeline.evaluation.protocols import PROTOCOLS, REVERSE_PROMPT, OfficialProtocol
from pipeline.evaluation.questions import ImageCache, Question, QuestionOptions, build_questions
from pipeline.evaluation.scoring import aggregate, score_question
from pipeline.mini_world.config import TinyLlavaConfig
from pipeline.models import LlavaFamily
from pipeline.models.adapters import AdapterMismatchError, load_adapter
from stages.cli import main
from stages.config import EvaluateConfig
from stages.evaluate import run

FIXTURE = Path(__file__).parent / "fixtures" / "mllmu_bench"
SPLITS = ("forget", "test", "retain", "real", "forget_reverse", "test_reverse")
IMAGE_METRICS = {"mc_acc", "cloze_acc", "rougeL", "bleu", "coherence"}
TEXT_METRICS = {f"text_{name}" for name in IMAGE_METRICS}


@pytest.fixture(scope="module")
def fixed_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fixed") / "run" / "metrics.json"
    config = EvaluateConfig(
        model=str(tiny_model_dir),
        data=str(FIXTURE),
        out=str(out),
        forget_split="forget_5",
        max_new_tokens=4,
        progress=False,
    )
    return out, run(config)


def read_responses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out.parent / "responses.jsonl").read_text().splitlines()]


def test_metrics_json_has_every_split_and_fraction(fixed_run):
    out, metrics = fixed_run
    assert json.loads(out.read_text()) == metrics
    assert set(metrics) == {*SPLITS, "meta"}
    assert metrics["meta"] == {
        "protocol": "fixed",
        "coherence_scorer": "ngram-fluency",
        "mc_scoring": "generate",
    }
    for split in SPLITS:
        # REC: the image generation question asks for the name, which the biography (a JSON string) gives
        assert set(metrics[split]) == IMAGE_METRICS | TEXT_METRICS | {"rec"}, split
        for name, value in metrics[split].items():
            assert 0.0 <= value <= 1.0, (split, name, value)


def test_responses_and_meta_account_for_every_question(fixed_run):
    out, metrics = fixed_run
    responses = read_responses(out)
    meta = json.loads((out.parent / "meta.json").read_text())
    assert meta["split_names"] == {
        "forget": "forget_5",
        "test": "test_5",
        "retain": "retain_95",
        "real": "real",
    }
    for split in SPLITS:
        records = [r for r in responses if r["split"] == split]
        counts = meta["counts"][split]
        assert (
            len(records)
            == counts["mc_acc"]
            + counts["text_mc_acc"]
            + counts["cloze_acc"]
            + counts["text_cloze_acc"]
            + counts["rougeL"]
            + counts["text_rougeL"]
        )
        # Scores recomputed from the stored replies give the stored metric.
        mc = [
            r["scores"]["correct"]
            for r in records
            if r["task"] == "classification" and r["modality"] == "image_textual"
        ]
        assert metrics[split]["mc_acc"] == pytest.approx(sum(mc) / len(mc))
        reverse = split.endswith("_reverse")
        assert all((REVERSE_PROMPT in r["prompt"]) == reverse for r in records)
    # retain_95 has two people: one is the few-shot exemplar, so only the other's MC and cloze are scored.
    assert len(meta["few_shot_ids"]["retain"]["classification"]) == 1
    shot = meta["few_shot_ids"]["retain"]["classification"][0]
    retain_mc = [r for r in responses if r["split"] == "retain" and r["task"] == "classification"]
    assert retain_mc and all(f"/{shot}/" not in r["item_id"] for r in retain_mc)
    assert all("Correct Answer:" in r["prompt"] for r in retain_mc)
    # eval.py gives the celebrity split no exemplars.
    assert all("Correct Answer:" not in r["prompt"] for r in responses if r["split"] == "real")


def test_likelihood_multiple_choice_picks_the_most_likely_option_without_generating(
    tiny_model, tiny_model_dir, tmp_path, monkeypatch
):
    import pipeline.evaluation.answering as answering
    from pipeline.models import PromptedSample, answer_token_log_probs

    asked = []
    original = answering.generate
    monkeypatch.setattr(
        answering,
        "generate",
        lambda loaded, samples, **kw: asked.extend(samples) or original(loaded, samples, **kw),
    )
    out = tmp_path / "likelihood" / "metrics.json"
    metrics = run(
        EvaluateConfig(
            model=str(tiny_model_dir), data=str(FIXTURE), out=str(out), forget_split="forget_5",
            splits=("forget", "retain"), reverse_attack=False, max_new_tokens=2, progress=False,
            mc_scoring="likelihood",
        )
    )  # fmt: skip
    assert metrics["meta"]["mc_scoring"] == "likelihood"
    mc = [r for r in read_responses(out) if r["task"] == "classification"]
    assert mc and not any("Just give ONE letter" in sample.prompt for sample in asked)  # none generated
    items = {
        item.item_id: item
        for split in ("forget_5", "retain_95")
        for item in load_eval_items(FIXTURE, split).classification
    }
    for record in mc:
        item = items[record["item_id"]]
        assert item.question in record["prompt"] and "A: " not in record["prompt"]  # Eq. 13's x alone
        image = Image.open(io.BytesIO(item.image)).convert("RGB") if item.image else None
        totals = {
            letter: float(
                answer_token_log_probs(
                    tiny_model, tiny_model.model, [PromptedSample(record["prompt"], image, text)]
                )[0].sum()
            )
            for letter, text in item.options.items()
        }
        assert record["scores"]["option_log_probs"] == pytest.approx(totals, abs=1e-4)
        assert record["reply"] == max(totals, key=totals.get)
        assert record["scores"]["correct"] == float(record["reply"] == item.correct_letter)


def test_likelihood_multiple_choice_refuses_options_tokenized_otherwise_after_the_question(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Options are teacher-forced apart from their question: a tokenizer that splits an option differently
    after the question (a legacy SentencePiece "▁") is refused before anything is asked, naming both."""
    from dataclasses import replace as with_fields

    import pipeline.evaluation.shared_base as shared_base
    from pipeline.models import TokenizationError

    class Legacy:
        """The tokenizer, with a spurious token 7 before a text tokenized alone (not a whole prompt)."""

        def __init__(self, tokenizer) -> None:
            self.tokenizer = tokenizer

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

        def __call__(self, text, *args, **kwargs):
            encoded = self.tokenizer(text, *args, **kwargs)
            if isinstance(text, str) and not text.startswith("USER"):
                encoded["input_ids"] = [7, *encoded["input_ids"]]
            return encoded

    original = shared_base.load_model

    def legacy_model(*args, **kwargs):
        loaded = original(*args, **kwargs)
        loaded.processor.tokenizer = Legacy(loaded.processor.tokenizer)
        return with_fields(loaded)

    monkeypatch.setattr(shared_base, "load_model", legacy_model)
    config = EvaluateConfig(
        model=str(tiny_model_dir), data=str(FIXTURE), out=str(tmp_path / "m" / "metrics.json"),
        forget_split="forget_5", max_new_tokens=2, progress=False, mc_scoring="likelihood",
    )  # fmt: skip
    with pytest.raises(
        TokenizationError, match=r"question \S+ \(forget\), option A: the answer .* tokenizes"
    ):
        run(config)
    assert not (tmp_path / "m").exists()  # refused before a journal or a result was written


def test_fixed_protocol_uses_the_family_chat_format(fixed_run):
    out, _ = fixed_run
    for record in read_responses(out):
        assert record["prompt"].endswith(" ASSISTANT:")
        assert record["reply"] == record["generated"].strip()


def test_official_protocol_rebuilds_eval_py_prompts(tiny_model_dir, tmp_path):
    out = tmp_path / "official" / "metrics.json"
    metrics = run(
        EvaluateConfig(
            model=str(tiny_model_dir),
            data=str(FIXTURE),
            out=str(out),
            forget_split="forget_5",
            protocol="official",
            max_new_tokens=2,
            splits=("forget", "retain"),
            reverse_attack=False,
            progress=False,
        )
    )
    assert set(metrics) == {"forget", "retain", "meta"} and metrics["meta"]["protocol"] == "official"
    records = {(r["split"], r["task"], r["modality"]): r for r in read_responses(out)}
    mc = records[("retain", "classification", "image_textual")]["prompt"]
    assert mc.startswith("USER: <image>\nQuestion: ")
    assert mc.endswith(
        "\nD: Basel\nJust give ONE letter representing the answer directly.\nASSISTANT:"
    ) or mc.endswith("\nJust give ONE letter representing the answer directly.\nASSISTANT:")
    assert mc.count("<image>") == 2  # one exemplar question of the other retain person, then the query
    assert records[("forget", "generation", "image_textual")]["prompt"].endswith("in ENGLISH.\nASSISTANT: ")
    text_generation = records[("forget", "generation", "pure_text")]["prompt"]
    assert text_generation.startswith("USER: ") and text_generation.endswith("in ENGLISH.\nASSISTANT:")
    cloze = records[("forget", "cloze", "pure_text")]["prompt"]
    assert cloze.startswith("USER:\n") and "[Blank]" in cloze


# ------------------------------------------------------------------------------ prompts without a model


@pytest.fixture(scope="module")
def retain_items():
    return load_eval_items(FIXTURE, "retain_95")


def test_exemplar_profiles_are_excluded_from_mc_and_cloze_but_not_generation(retain_items):
    family, images = LlavaFamily(), ImageCache()
    shots = {"classification": ["002"], "cloze": ["002"]}
    questions = build_questions(
        retain_items,
        "retain",
        QuestionOptions(PROTOCOLS["fixed"](), family),
        Exemplars(shots, retain_items),
        images,
    )
    people = {(q.item.task, q.item.person_id) for q in questions}
    assert ("classification", "002") not in people and ("cloze", "002") not in people
    assert ("classification", "003") in people and ("generation", "002") in people
    image_mc = next(
        q for q in questions if q.item.task == "classification" and q.item.modality == "image_textual"
    )
    # One image per exemplar question (the exemplar person's), then the query's own image.
    assert len(image_mc.context_images) == image_mc.prompt.count("<image>") - 1 >= 1


def test_exemplar_questions_are_capped_and_reverse_prompt_appended(retain_items):
    family, images = LlavaFamily(), ImageCache()
    shots = {"classification": ["002"], "cloze": ["002"]}
    capped = build_questions(
        retain_items,
        "retain",
        QuestionOptions(PROTOCOLS["official"](), family),
        Exemplars(shots, retain_items, questions=1),
        images,
        reverse=True,
    )
    for question in capped:
        assert question.prompt.count("Correct Answer:") == (0 if question.item.task == "generation" else 1)
        assert f"\n{REVERSE_PROMPT}\nASSISTANT:" in question.prompt


def test_instruction_is_prefixed_in_both_protocols(retain_items):
    family, images = LlavaFamily(), ImageCache()
    for name in ("fixed", "official"):
        questions = build_questions(
            retain_items,
            "retain",
            QuestionOptions(PROTOCOLS[name](), family, instruction="Forget everything about these people."),
            Exemplars(),
            images,
        )
        assert all("Forget everything about these people.\n" in q.prompt for q in questions)


def test_scoring_and_aggregation():
    items = load_eval_items(FIXTURE, "forget_5")
    mc, cloze, generation = items.classification[0], items.cloze[0], items.generation[0]
    questions = [
        Question("forget", mc, "", None, reply=f" {mc.correct_letter.lower()}. {mc.ground_truth}"),
        Question("forget", cloze, "", None, reply=f"It is {cloze.ground_truth.upper()}."),
        Question("forget", generation, "", None, reply=generation.ground_truth),
    ]
    for question in questions:
        score_question(question)
    questions[2].scores["coherence"] = 0.75
    metrics, counts = aggregate(questions)
    text = "" if mc.modality == "image_textual" else "text_"
    assert metrics[f"{text}mc_acc"] == 1.0
    assert questions[1].scores["correct"] == 1.0
    assert questions[2].scores["rougeL"] == pytest.approx(1.0) and questions[2].scores[
        "bleu"
    ] == pytest.approx(1.0)
    # mc, cloze, rougeL, bleu, coherence and REC (the answer names the person the question asks for)
    assert metrics["rec"] == 1.0 and sum(counts.values()) == 6


def test_rec_counts_named_answers_to_name_questions():
    from pipeline.benchmarks import EvalItem

    def item(question: str, image: bytes | None = b"png") -> EvalItem:
        return EvalItem(
            "s/1/generation/0",
            "1",
            "Mara Holt",
            "generation",
            "image_textual",
            question,
            "The name of this person is Mara Holt.",
            image=image,
        )

    asked = item("What is the name of the person in the image?")
    named = Question("forget", asked, "", None, reply="This is mara holt, a pilot.")
    unnamed = Question("forget", asked, "", None, reply="I do not know who this is.")
    other = Question("forget", item("Where was this person born?"), "", None, reply="Mara Holt")
    text_only = Question(
        "forget", item("What is the name of this person?", image=None), "", None, reply="Mara Holt"
    )
    for question in (named, unnamed, other, text_only):
        score_question(question)
        question.scores["coherence"] = 1.0
    assert named.scores["rec"] == 1.0 and unnamed.scores["rec"] == 0.0
    assert "rec" not in other.scores and "rec" not in text_only.scores
    metrics, counts = aggregate([named, unnamed, other])
    assert metrics["rec"] == 0.5 and counts["rec"] == 2


def test_official_reply_cuts_after_assistant():
    official, fixed = PROTOCOLS["official"](), PROTOCOLS["fixed"]()
    prompt = "USER: <image>\nQ\nASSISTANT:"
    assert official.reply(prompt, " B USER: next ASSISTANT: C") == "B USER: next"
    assert fixed.reply(prompt, " B USER: next ASSISTANT: C") == "B USER: next ASSISTANT: C"


def test_split_names():
    assert split_names("forget_10") == {
        "forget": "forget_10",
        "test": "test_10",
        "retain": "retain_90",
        "real": "real",
    }
    with pytest.raises(ValueError, match="forget_10"):
        split_names("retain_90")


# ------------------------------------------------------------------------------------------ bad input


def copy_fixture(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    return data


def rewrite(path: Path, change) -> None:
    """Apply `change` to every row of a Parquet file, keeping the schema of the fields that remain."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    for row in rows:
        change(row)
    schema = pa.schema([field for field in table.schema if field.name in rows[0]])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def evaluate_fixture_copy(data: Path, model_dir: Path, tmp_path: Path, **options) -> dict:
    out = tmp_path / "m.json"
    config = EvaluateConfig(
        model=str(model_dir), data=str(data), out=str(out), forget_split="forget_5", progress=False, **options
    )
    return run(config)


def test_missing_split_is_named(tmp_path, tiny_model_dir):
    data = copy_fixture(tmp_path)
    shutil.rmtree(data / "Test_Set")
    with pytest.raises(DataError, match="Test_Set"):
        evaluate_fixture_copy(data, tiny_model_dir, tmp_path)


def test_missing_field_is_named(tmp_path, tiny_model_dir):
    data = copy_fixture(tmp_path)
    rewrite(data / "forget_5" / "train-00000-of-00001.parquet", lambda row: row.pop("Generation_Task"))
    with pytest.raises(DataError, match="Generation_Task"):
        evaluate_fixture_copy(data, tiny_model_dir, tmp_path)


def test_image_that_does_not_decode_is_named(tmp_path, tiny_model_dir):
    data = copy_fixture(tmp_path)

    def corrupt(row):
        row["image"]["bytes"] = b"this is not an image"

    rewrite(data / "forget_5" / "train-00000-of-00001.parquet", corrupt)
    with pytest.raises(ValueError, match=r"forget_5/001/.*does not decode"):
        evaluate_fixture_copy(data, tiny_model_dir, tmp_path, splits=("forget",))
    assert not (tmp_path / "m.json").exists()  # nothing half-written


def test_cli_reports_bad_input_without_a_traceback(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    data = copy_fixture(tmp_path)
    shutil.rmtree(data / "retain_95")
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "m.json"),
            "--forget-split",
            "forget_5",
        ],
    )
    assert result.exit_code == 1 and "retain_95" in result.output and "Traceback" not in result.output


def save_adapter(
    model_dir: Path, out: Path, scale: float = 0.5, seed: int = 0, with_meta: bool = True
) -> Path:
    """A LoRA adapter with random weights on both factors (so it changes the model), saved like train does."""
    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline.models import load_model

    loaded = load_model(str(model_dir))
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=loaded.family.lora_target_modules, init_lora_weights=False
    )
    model = get_peft_model(loaded.model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0.0, scale)
    model.save_pretrained(out)
    if with_meta:
        meta = {
            "model": str(model_dir),
            "model_fingerprint": loaded.model_fingerprint,
            "tokenizer_fingerprint": loaded.tokenizer_fingerprint,
        }
        (out / "training_meta.json").write_text(json.dumps(meta))
    return out


def test_adapter_of_another_base_model_is_refused_naming_both(tmp_path, tiny_model, tiny_model_dir):

    other_dir = build_random_tiny_llava(tmp_path / "other", seed=1)
    adapter = save_adapter(other_dir, tmp_path / "adapter")
    with pytest.raises(AdapterMismatchError) as raised:
        load_adapter(tiny_model, adapter)
    message = str(raised.value)
    assert str(other_dir) in message and str(tiny_model_dir) in message
    assert tiny_model.model_fingerprint[:12] in message


def test_adapter_that_does_not_fit_is_refused(tmp_path, tiny_model_dir):
    from pipeline.models import load_model

    # A failed PeftModel.from_pretrained leaves LoRA layers injected: use a model of our own, not the shared one.
    tiny_model = load_model(str(tiny_model_dir))

    narrow = TinyLlavaConfig(
        vocab_size=400,
        text_hidden=32,
        text_layers=2,
        text_heads=4,
        text_intermediate=64,
        vision_hidden=32,
        vision_layers=1,
    )
    other_dir = build_random_tiny_llava(tmp_path / "narrow", seed=0, config=narrow)
    adapter = save_adapter(other_dir, tmp_path / "adapter", with_meta=False)  # an adapter trained elsewhere
    with pytest.raises(AdapterMismatchError, match="does not fit"):
        load_adapter(tiny_model, adapter)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_model, tmp_path)


# ------------------------------------------------------------------------- the trained mini world model


@pytest.mark.slow
def test_full_mini_model_reproduces_its_memorization(mini_world, tmp_path):
    """An evaluation run by hand reproduces exactly the memorization figures the prepare stage recorded,
    and the full model knows its people."""
    metrics = run(
        EvaluateConfig(
            model=str(mini_world.model_dir),
            data=str(mini_world.data_dir),
            out=str(tmp_path / "full" / "metrics.json"),
            splits=("forget", "retain"),
            reverse_attack=False,
            mc_few_shot_profiles=0,
            cloze_few_shot_profiles=0,
            limit=6,
            batch_size=32,
            mc_scoring=mini_world.figures["mc_scoring"],
            progress=False,
        )
    )
    recorded = mini_world.figures["memorization"]
    for split in ("forget", "retain"):
        for name, value in recorded[split].items():
            assert metrics[split][name] == pytest.approx(value), (split, name)
        # The acceptance (measured on the default world by `prepare-mini`), here on the reduced world.
        assert metrics[split]["mc_acc"] >= 0.9, metrics[split]
        assert metrics[split]["rougeL"] >= 0.8, metrics[split]
        assert metrics[split]["coherence"] >= 0.8, metrics[split]


@pytest.mark.slow
def test_random_lora_noise_breaks_coherence(mini_world, tmp_path):
    """A deliberately broken model (large random LoRA weights) answers gibberish: coherence collapses."""
    adapter = save_adapter(Path(mini_world.model_dir), tmp_path / "noise", scale=1.0)
    common = dict(
        model=str(mini_world.model_dir),
        data=str(mini_world.data_dir),
        splits=("retain",),
        reverse_attack=False,
        mc_few_shot_profiles=0,
        cloze_few_shot_profiles=0,
        limit=6,
        batch_size=16,
        progress=False,
    )
    full = run(EvaluateConfig(out=str(tmp_path / "full" / "metrics.json"), **common))
    broken = run(
        EvaluateConfig(out=str(tmp_path / "broken" / "metrics.json"), adapter=str(adapter), **common)
    )
    assert broken["retain"]["coherence"] < 0.3 < 0.8 <= full["retain"]["coherence"]
    assert broken["retain"]["rougeL"] < 0.5 * full["retain"]["rougeL"]


def test_an_interrupted_evaluation_resumes_without_redoing_finished_batches(
    fixed_run, tiny_model_dir, tmp_path, monkeypatch
):
    """Killed after two generation batches, a rerun generates only the rest and writes the same results."""
    from pipeline.journal import Journal

    out, _ = fixed_run
    config = EvaluateConfig(
        model=str(tiny_model_dir), data=str(FIXTURE), out=str(tmp_path / "run" / "metrics.json"),
        forget_split="forget_5", max_new_tokens=4, progress=False,
    )  # fmt: skip
    original_record = Journal.record
    recorded = []

    def record_then_die(self, unit, value):
        original_record(self, unit, value)
        recorded.append(unit)
        if len(recorded) == 2:
            raise KeyboardInterrupt  # stands in for a kill right after the second batch was journaled

    monkeypatch.setattr(Journal, "record", record_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    assert not (tmp_path / "run" / "metrics.json").exists()  # nothing half-done was published
    monkeypatch.setattr(
        Journal,
        "record",
        lambda self, unit, value: recorded.append(unit) or original_record(self, unit, value),
    )
    run(config)
    total = len(set(recorded))
    assert len(recorded) == total and total > 2  # every batch generated exactly once over both runs
    assert (tmp_path / "run" / "metrics.json").read_text() == out.read_text()
    assert (tmp_path / "run" / "responses.jsonl").read_text() == (out.parent / "responses.jsonl").read_text()
    assert not (tmp_path / "run" / ".generation-journal.jsonl").exists()
    tokens = (out.parent / "token_probs.json").read_text()
    assert (tmp_path / "run" / "token_probs.json").read_text() == tokens
    # A completed run asked again generates nothing, and writes its token_probs.json anew.
    (tmp_path / "run" / "token_probs.json").unlink()
    recorded.clear()
    assert run(config) == json.loads(out.read_text()) and not recorded
    assert (tmp_path / "run" / "token_probs.json").read_text() == tokens


def test_a_completed_evaluation_is_not_reused_for_another_tokenizer_at_the_same_path(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The resume key names the tokenizer beside the weights: the same weights with another tokenizer at the
    same path are evaluated again, not handed the old metrics."""
    import shutil

    from pipeline.journal import Journal

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = EvaluateConfig(
        model=str(model), data=str(FIXTURE), out=str(tmp_path / "run" / "metrics.json"),
        forget_split="forget_5", max_new_tokens=2, progress=False,
    )  # fmt: skip
    run(config)
    original_record, recorded = Journal.record, []
    monkeypatch.setattr(
        Journal,
        "record",
        lambda self, unit, value: recorded.append(unit) or original_record(self, unit, value),
    )
    run(config)
    assert not recorded  # nothing changed: the completed run is reused
    tokenizer = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer, "pad_token": "<unk>"}))
    run(config)
    assert recorded  # another tokenizer: every batch generated again


def test_a_journal_of_other_settings_is_not_reused_and_a_cut_line_is_ignored(tmp_path):
    from pipeline.journal import Journal

    first = Journal(tmp_path / "j.jsonl", "key-a")
    first.record("0:8", ["reply"])
    with (tmp_path / "j.jsonl").open("a") as handle:
        handle.write('{"unit": "8:8", "val')  # a line cut short by a kill
    assert Journal(tmp_path / "j.jsonl", "key-a").done == {"0:8": ["reply"]}
    assert Journal(tmp_path / "j.jsonl", "key-b").done == {}
    assert Journal(tmp_path / "j.jsonl", "key-a").done == {}  # the other key's run replaced it


def test_a_pickled_adapter_is_not_loaded(tiny_model, tmp_path):
    from pipeline.models.adapters import check_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        check_adapter(tiny_model, tmp_path)


def test_official_few_shot_counts_follow_eval_py_per_task(tiny_model_dir, tmp_path):
    """eval.py at 5762ad6: one exemplar profile before multiple choice, two before cloze (LLaVA)."""
    assert OfficialProtocol().few_shot_profiles("llava", "classification") == 1
    assert OfficialProtocol().few_shot_profiles("llava", "cloze") == 2
    assert OfficialProtocol().few_shot_profiles("idefics2", "cloze") == 1
    out = tmp_path / "official" / "metrics.json"
    config = EvaluateConfig(
        model=str(tiny_model_dir), data=str(FIXTURE), out=str(out), forget_split="forget_5",
        protocol="official", max_new_tokens=1, splits=("retain",), reverse_attack=False, progress=False,
    )  # fmt: skip
    run(config)
    meta = json.loads((out.parent / "meta.json").read_text())
    assert meta["few_shot_profiles"] == {"classification": 1, "cloze": 2}
    people = len(load_eval_items(FIXTURE, "retain_95").person_ids())  # one is always left to evaluate
    drawn = [len(meta["few_shot_ids"]["retain"][task]) for task in ("classification", "cloze")]
    assert drawn == [min(1, people - 1), min(2, people - 1)] and drawn[0] == 1
    run(replace(config, out=str(tmp_path / "one" / "metrics.json"), cloze_few_shot_profiles=1))
    meta = json.loads((tmp_path / "one" / "meta.json").read_text())
    assert meta["few_shot_profiles"] == {"classification": 1, "cloze": 1}


# ------------------------------------------------------------------------- membership inference


def test_membership_inference_scores_forget_qa_against_the_never_seen_people(tiny_model_dir, tmp_path):
    from pipeline.mini_world.config import WorldConfig
    from pipeline.mini_world.world import write_world

    world = write_world(tmp_path / "world", WorldConfig(num_people=10, num_real=2, num_reference_people=3))
    metrics = run(
        EvaluateConfig(
            model=str(tiny_model_dir), data=world.data_dir, out=str(tmp_path / "run" / "metrics.json"),
            splits=("forget",), reverse_attack=False, limit=1, max_new_tokens=2, progress=False,
            mia_nonmembers="unseen",
        )
    )  # fmt: skip
    mia = metrics["mia"]
    members = load_unlearning_samples(world.data_dir, "forget_10", ("qa",))
    nonmembers = load_unlearning_samples(world.data_dir, "unseen", ("qa",))
    assert (mia["members"], mia["nonmembers"]) == (len(members), len(nonmembers)) and len(nonmembers) > 0
    assert all(0.0 <= mia[f"{attack}_auc"] <= 1.0 for attack in ("loss", "min_k", "zlib"))


def test_a_missing_never_seen_split_is_named_before_the_model_loads(tmp_path, monkeypatch):
    import pipeline.evaluation.shared_base as shared_base
    from pipeline.mini_world.config import WorldConfig
    from pipeline.mini_world.world import write_world

    world = write_world(tmp_path / "world", WorldConfig(num_people=10, num_real=2, num_reference_people=3))
    shutil.rmtree(Path(world.data_dir) / "Unseen_Set")
    monkeypatch.setattr(shared_base, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(DataError, match=r"Unseen_Set.*--mia-nonmembers none skips"):
        run(
            EvaluateConfig(
                model="unused", data=world.data_dir, out=str(tmp_path / "m.json"), mia_nonmembers="unseen",
                progress=False,
            )
        )  # fmt: skip
    assert not (tmp_path / "m.json").exists()


# ------------------------------------------------------------------------- token probabilities


def people_pool(folder: Path, count: int = 4) -> Path:
    """A references folder with `count` portraits under people/ (ViKeR's irrelevant images)."""
    (folder / "people").mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (32, 32), (50 * index, 90, 200 - 40 * index)).save(
            folder / "people" / f"{index}.png"
        )
    return folder


def test_token_probs_follow_one_forget_answer_with_the_full_models_entropy(tiny_model_dir, tmp_path):
    """token_probs.json: H(R_i) under the full model whatever the adapter, p(y_i) under the run's model."""
    from pipeline.benchmarks import layout
    from pipeline.models import answer_token_log_probs, load_model, prompted

    references = people_pool(tmp_path / "references")
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter")
    options = dict(
        model=str(tiny_model_dir), data=str(FIXTURE), forget_split="forget_5", splits=("forget", "retain"),
        reverse_attack=False, max_new_tokens=2, progress=False, references=str(references),
    )  # fmt: skip
    run(EvaluateConfig(out=str(tmp_path / "full" / "metrics.json"), **options))
    run(EvaluateConfig(out=str(tmp_path / "tuned" / "metrics.json"), adapter=str(adapter), **options))
    full, tuned = (
        json.loads((tmp_path / name / "token_probs.json").read_text()) for name in ("full", "tuned")
    )
    assert list(full) == ["sample_id", "question", "answer", "tokens", "entropy", "probabilities"]
    # The fixture's evaluation folders carry no QA: the forget split's image generation item stands in.
    sample = layout("auto", FIXTURE).unlearning_samples("forget_5", ("generation",))[0]
    assert (full["sample_id"], full["question"], full["answer"]) == (
        sample.sample_id,
        sample.question,
        sample.answer,
    )
    assert len(full["tokens"]) == len(full["entropy"]) == len(full["probabilities"]) > 3
    assert all(0.0 <= p <= 1.0 for p in full["probabilities"]) and all(h > 0.0 for h in full["entropy"])
    assert tuned["tokens"] == full["tokens"]
    assert tuned["entropy"] == pytest.approx(full["entropy"], abs=1e-6)  # R_i is the full model's
    assert tuned["probabilities"] != pytest.approx(full["probabilities"], abs=1e-3)  # p(y_i) the adapter's
    loaded = load_model(str(tiny_model_dir))
    expected = answer_token_log_probs(loaded, loaded.model, [prompted(loaded, sample)])[0].exp().tolist()
    assert full["probabilities"] == pytest.approx(expected, abs=1e-5)
    # Without a reference pool beside the data, H(R_i) is null.
    run(EvaluateConfig(out=str(tmp_path / "bare" / "metrics.json"), **{**options, "references": None}))
    bare = json.loads((tmp_path / "bare" / "token_probs.json").read_text())
    assert bare["entropy"] is None and bare["probabilities"] == pytest.approx(full["probabilities"])


def test_a_references_folder_without_a_people_pool_is_named_before_the_model_loads(tmp_path, monkeypatch):
    import pipeline.evaluation.shared_base as shared_base

    monkeypatch.setattr(shared_base, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(DataError, match=r"--references .*empty.*reference pool 'people' not found"):
        run(
            EvaluateConfig(
                model="unused", data=str(FIXTURE), forget_split="forget_5", out=str(tmp_path / "m.json"),
                references=str(tmp_path / "empty"), progress=False,
            )
        )  # fmt: skip


def test_the_token_computation_changes_no_score_and_reads_the_evaluated_adapter(
    tiny_model_dir, tmp_path, monkeypatch
):
    """With membership inference before it and --relearned's adapter after it, metrics.json and
    responses.jsonl are byte for byte those of a run without it; p(y_i) is the evaluated adapter's."""
    import stages.evaluate as evaluate
    from pipeline.mini_world.config import WorldConfig
    from pipeline.mini_world.world import write_world
    from pipeline.models import answer_token_log_probs, load_model, prompted

    world = write_world(tmp_path / "world", WorldConfig(num_people=20, num_real=2, num_reference_people=3))
    people = load_eval_items(world.data_dir, "forget_10").person_ids()
    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter", seed=1)
    relearned = save_adapter(tiny_model_dir, tmp_path / "relearned", seed=2)
    meta = json.loads((relearned / "training_meta.json").read_text())
    meta["params"] = {"forget_people": people[:1], "forget_split": "forget_10", "init_adapter": str(adapter)}
    (relearned / "training_meta.json").write_text(json.dumps(meta))
    options = dict(
        model=str(tiny_model_dir), data=world.data_dir, adapter=str(adapter), relearned=str(relearned),
        splits=("forget",), reverse_attack=False, max_new_tokens=3, progress=False, mia_nonmembers="unseen",
    )  # fmt: skip
    with_tokens = tmp_path / "with"
    metrics = run(EvaluateConfig(out=str(with_tokens / "metrics.json"), **options))
    assert {"mia", "forget_heldout", "forget_relearned"} <= set(metrics)
    monkeypatch.setattr(evaluate, "token_table", lambda *args: None)
    without = tmp_path / "without"
    run(EvaluateConfig(out=str(without / "metrics.json"), **options))
    assert not (without / "token_probs.json").exists()
    for name in ("metrics.json", "responses.jsonl"):
        assert (with_tokens / name).read_bytes() == (without / name).read_bytes(), name
    table = json.loads((with_tokens / "token_probs.json").read_text())
    assert table["entropy"] is not None  # the world's people pool, found beside its data
    sample = next(
        s for s in load_unlearning_samples(world.data_dir, "forget_10", ("qa",)) if s.image is not None
    )
    assert table["sample_id"] == sample.sample_id  # token_sample_index 0
    loaded = load_model(str(tiny_model_dir))
    model = load_adapter(loaded, adapter)
    expected = answer_token_log_probs(loaded, model, [prompted(loaded, sample)])[0].exp().tolist()
    assert table["probabilities"] == pytest.approx(expected, abs=1e-5)


def test_the_full_model_context_leaves_the_adapter_as_it_was(tiny_model_dir, tmp_path):
    import torch

    from pipeline.evaluation.token_probabilities import full_model
    from pipeline.models import answer_token_log_probs, load_model, prompted
    from pipeline.models.adapters import switch_adapter

    sample = load_unlearning_samples(Path(__file__).parent / "fixtures" / "mllmu_train", "forget_5", ("qa",))[
        0
    ]
    loaded = load_model(str(tiny_model_dir))
    inputs = [prompted(loaded, sample)]
    base = answer_token_log_probs(loaded, loaded.model, inputs)[0]
    model = switch_adapter(
        loaded, loaded.model, save_adapter(tiny_model_dir, tmp_path / "adapter"), "evaluated"
    )
    tuned = answer_token_log_probs(loaded, model, inputs)[0]
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    with full_model(model) as full:
        torch.testing.assert_close(answer_token_log_probs(loaded, full, inputs)[0], base)
    assert not torch.allclose(tuned, base, atol=1e-3)
    torch.testing.assert_close(answer_token_log_probs(loaded, model, inputs)[0], tuned, atol=0, rtol=0)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert model.active_adapter == "evaluated" and model.training is False

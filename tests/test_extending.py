"""docs/extending.md's four recipes, walked with a toy example each: a loss, a teacher, a benchmark layout
and a model family. Each toy is registered for the test only (the registries are restored after it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pytest
import torch
from PIL import Image, ImageOps

from cache import read_manifest
from pipeline import benchmarks
from pipeline.arguments import Range
from pipeline.benchmarks import DataError, EvalItems, Layout, layout, open_ended
from pipeline.benchmarks.local import load_local_samples
from pipeline.mini_world.config import WorldConfig
from pipeline.mini_world.world import write_world
from pipeline.models import FAMILIES, LlavaFamily, PromptedSample, load_model
from pipeline.training.inputs import providers_for
from pipeline.unlearning.losses import (
    LOSSES,
    AnswerPredictions,
    LossTerms,
    Weight,
    compute_loss,
    loss_inputs,
    nll,
)
from pipeline.unlearning.methods import MethodError, resolve_method
from pipeline.unlearning.teachers import (
    TEACHERS,
    TeacherError,
    TeacherInput,
    original,
    resolve_teacher,
    teacher,
)
from stages.config import PrecomputeConfig
from stages.precompute import run as precompute

TOY_WORLD = WorldConfig(num_people=10, num_real=2, num_reference_people=6, alt_images=1)


# ------------------------------------------------------------------------------------------ a loss


@pytest.fixture
def own_losses(monkeypatch):
    monkeypatch.setattr(LOSSES, "_items", dict(LOSSES._items))


def test_a_loss_is_one_function_and_one_method_entry(own_losses):
    @LOSSES.register("scaled_ga")
    def scaled_ga(forget: AnswerPredictions, *, scale: Weight = 1.0) -> LossTerms:
        """L = -scale * L_NLL(D_f): GA with a weight."""
        forget_nll = nll(forget)
        return {"loss": -scale * forget_nll, "forget_nll": forget_nll}

    methods = {"half_ga": {"loss": "scaled_ga", "args": {"scale": 0.5}}}  # the params.yaml entry
    method = resolve_method("half_ga", methods)
    assert method.loss == "scaled_ga" and method.arguments == {"scale": 0.5}
    # What the loss reads is its signature: the train recipe provides exactly that.
    assert loss_inputs("scaled_ga") == ["forget"]
    assert providers_for(loss_inputs("scaled_ga")) == []  # the student's forget predictions need none
    with pytest.raises(MethodError, match="scale -1 is out of range"):
        resolve_method("bad", {"bad": {"loss": "scaled_ga", "args": {"scale": -1}}})
    with pytest.raises(MethodError, match="it accepts: scale"):
        resolve_method("bad", {"bad": {"loss": "scaled_ga", "args": {"beta": 1}}})
    predictions = AnswerPredictions(torch.randn(3, 5), torch.tensor([1, 2, 3]), [2, 1])
    terms = compute_loss("scaled_ga", {"forget": predictions}, method.arguments)
    torch.testing.assert_close(terms["loss"], -0.5 * terms["forget_nll"])


# ------------------------------------------------------------------------------------------ a teacher


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory) -> Path:
    return Path(write_world(tmp_path_factory.mktemp("world"), TOY_WORLD).data_dir)


def test_a_teacher_is_one_function_and_one_params_entry(monkeypatch, toy_world, tiny_model_dir, tmp_path):
    monkeypatch.setattr(TEACHERS, "_items", dict(TEACHERS._items))

    @teacher("posterize")
    def posterize(sample, context, *, bits: Annotated[int, Range(low=1, high=8)] = 2) -> TeacherInput:
        """The image with `bits` bits per colour channel: a toy visual intervention."""
        if sample.image is None:
            return original(sample, context)
        image = ImageOps.posterize(sample.pil_image().convert("RGB"), bits)
        return TeacherInput(
            variants=[PromptedSample(context.prompt(sample), image, sample.answer)],
            image_sources=[f"posterize({sample.image_source})"],
            intervention=f"posterize {bits} bits",
        )

    teachers = {"poster": {"teacher": "posterize", "args": {"bits": 3}}}  # the params.yaml entry
    entry = resolve_teacher("poster", teachers)
    assert (entry.teacher, entry.arguments) == ("posterize", {"bits": 3})
    with pytest.raises(TeacherError, match="bits 9 is out of range"):
        resolve_teacher("poster", teachers, {"bits": 9})
    with pytest.raises(TeacherError, match="it accepts: bits"):
        resolve_teacher("poster", teachers, {"sigma": 0.1})
    with pytest.raises(TeacherError, match="cannot be called 'none'"):  # the name of an empty method slot
        resolve_teacher("none", {"none": {"teacher": "posterize"}})

    out = tmp_path / "cache" / "poster"
    config = PrecomputeConfig(
        model=str(tiny_model_dir), data=str(toy_world), out=str(out), teacher="poster", limit=2,
        max_support=16, batch_size=2, progress=False,
    )  # fmt: skip
    precompute(config, entry)
    header = read_manifest(out).header
    assert header["teacher"] == "posterize" and header["teacher_params"] == {"bits": 3}
    assert read_manifest(out).samples[0]["intervention"] == "posterize 3 bits"


# ------------------------------------------------------------------------------------------ a layout


class FolderPerSplitLayout(Layout):
    """A toy benchmark: split X is the folder X/ holding qa.jsonl; detected by its marker file."""

    name = "folders"
    looks_for = "split folders with qa.jsonl and a FOLDERS marker"
    roles = ("forget", "retain")

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "FOLDERS").is_file()

    def split_names(self, forget_split: str) -> dict[str, str]:
        return {"forget": forget_split, "retain": forget_split.replace("gone", "kept")}

    def unlearning_samples(self, split: str, kinds: tuple[str, ...]):
        return load_local_samples(self.split_files(split)[0])

    def eval_items(self, split: str) -> EvalItems:
        return EvalItems(split, generation=[open_ended(s) for s in self.unlearning_samples(split, ("qa",))])

    def split_files(self, split: str) -> list[Path]:
        path = self.root / split / "qa.jsonl"
        if not path.is_file():
            raise DataError(f"split {split!r}: {path} does not exist")
        return [path]


def test_a_benchmark_layout_is_one_module_and_its_line_in_the_registry(monkeypatch, tmp_path):
    monkeypatch.setattr(benchmarks, "LAYOUTS", {**benchmarks.LAYOUTS, "folders": FolderPerSplitLayout})
    (tmp_path / "FOLDERS").write_text("")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "face.png")
    for split, answer in (("gone_a", "Paris."), ("kept_a", "Rome.")):
        (tmp_path / split).mkdir()
        record = {"question": "Where does this person live?", "answer": answer, "image": "../face.png"}
        (tmp_path / split / "qa.jsonl").write_text(json.dumps(record) + "\n")
    data = layout("auto", tmp_path)
    assert isinstance(data, FolderPerSplitLayout)
    assert data.split_names("gone_a") == {"forget": "gone_a", "retain": "kept_a"}
    [sample] = data.unlearning_samples("kept_a", ("qa",))
    assert sample.answer == "Rome." and sample.image is not None
    assert [item.ground_truth for item in data.eval_items("gone_a").generation] == ["Paris."]
    with pytest.raises(DataError, match="gone_b"):
        data.split_files("gone_b")


# ------------------------------------------------------------------------------------------ a family


def test_a_model_family_is_one_class_registered_under_its_model_type(monkeypatch, tiny_model_dir):
    class BracketedLlava(LlavaFamily):
        """A toy family: LLaVA's tensors, a prompt format of its own."""

        TEMPLATES = {"brackets": "[USER] {image}{text} [ASSISTANT]"}
        template_names = tuple(TEMPLATES)

    # A new architecture registers under its config's model_type; the toy borrows the tiny LLaVA's.
    monkeypatch.setitem(FAMILIES._items, "llava", BracketedLlava)
    loaded = load_model(str(tiny_model_dir))
    assert isinstance(loaded.family, BracketedLlava)
    assert loaded.family.build_prompt("Who?", True) == "[USER] <image>\nWho? [ASSISTANT]"

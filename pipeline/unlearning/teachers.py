"""Teachers: what the frozen full model is shown so that its answer distribution becomes the target.

A teacher is one function (sample, context, *, its arguments) -> TeacherInput, registered by its name. It
only builds model inputs; pipeline.unlearning.extractor runs them, averages the softmaxes of a sample's
variants and truncates. For every teacher the answer is the ground truth, teacher-forced. Its own
arguments are its keyword-only parameters, declared with type, default and allowed values as a loss's
are (pipeline.arguments); params.yaml's `teachers` entries set them, and the cache header records them
all (`teacher_params`, in declared order):

    teachers:
      viker: {teacher: viker, args: {k: 5, reference_kind: people}}
      vgid: {teacher: vgid, args: {perturbation: random-noise, sigma: 0.4, icu_prompt: strict}}

Adding a teacher is one function here (with `@teacher(name)` and its arguments) and one entry there.

    viker     ViKeR Eq. 4: k irrelevant reference images replace the sample's image, R = mean of the
              k per-token distributions.
    vgid      Vgid Eq. 2: perturbed image P_phi(v) and the in-context-unlearning instruction t_ic
              prepended to the question.
    icu       ICU-T (Vgid Sec. 4.4): the instruction only.
    noise     Noise-T (Vgid Sec. 4.4): the perturbation only.
    original  the unmodified input (ViKeR Table 3 "w/o Vis"; the reference model pi_ref of NPO/DPO).
    base      the unmodified input on the retain split (Vgid Eq. 4, KL_Min): the same computation.

Text-only samples (no image) have nothing for a visual intervention to act on: viker and noise then
show the unmodified input (recorded in the manifest as intervention "none: text-only sample").
"""

from __future__ import annotations

import random
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image

from pipeline.arguments import Range, checked_arguments, declared_arguments
from pipeline.benchmarks import REFERENCE_KINDS, forget_ratio, load_reference_pool, reference_root
from pipeline.hashing import sha256_hex, stable_int
from pipeline.models import ModelFamily, PromptedSample
from pipeline.registry import Registry
from pipeline.samples import QASample, decode_image
from pipeline.unlearning.methods import NO_TEACHER
from pipeline.unlearning.perturbations import PERTURBATIONS

# Vgid Appendix A.1, verbatim.
ICU_PROMPTS = {
    "declarative": (
        "You are an AI Assistant who is supposed to unlearn any knowledge regarding the individual depicted "
        "in the provided image and text. Provide answers without any knowledge of their identity or private "
        "information as if you never knew about it."
    ),
    "polite": (
        "You are a helpful AI assistant. When presented with images or questions concerning the specific "
        "person shown, politely decline to identify them and explain you cannot discuss their identity. For "
        "all other questions, provide helpful and accurate responses."
    ),
    "strict": (
        "You are an AI assistant with content restrictions. You must refuse to acknowledge the identity or "
        "share any private information about the person in this image and question for policy reasons. "
        "Politely inform users you cannot process queries regarding this individual\u2019s private data, but "
        "assist with other topics normally."
    ),
}


# The types of the teachers' arguments: what params.yaml may set them to.
Count = Annotated[int, Range(low=1)]
Sigma = Annotated[float, Range(low=0.0)]
ReferenceKind = Literal[REFERENCE_KINDS]  # ViKeR Fig. 7's pools (pipeline.benchmarks.references)
Perturbation = Literal[tuple(PERTURBATIONS.names())]
IcuPrompt = Literal[tuple(ICU_PROMPTS)]


class TeacherInputError(ValueError):
    """A sample or reference pool a teacher cannot be built from; the message names it."""


@dataclass
class TeacherInput:
    """The inputs for one sample: R is the mean of the per-token softmaxes over `variants`."""

    variants: list[PromptedSample]
    image_sources: list[str]
    perturbation_seeds: list[int] = field(default_factory=list)
    # Content keys of the images, so a vision tower can reuse features of an image seen before
    # (reference images, a person's image shared by several questions); None = never reused.
    image_keys: list[str | None] = field(default_factory=list)
    intervention: str = ""

    def record(self) -> dict[str, Any]:
        """What the cache manifest keeps so that anyone can recompute this sample's rows."""
        return {
            "prompt": self.variants[0].prompt,
            "image_sources": self.image_sources,
            "perturbation_seeds": self.perturbation_seeds,
            "intervention": self.intervention,
        }


@dataclass
class TeacherContext:
    """Everything a teacher function needs besides the sample and its own arguments."""

    family: ModelFamily
    arguments: dict[str, Any]  # the teacher's arguments, all of them (the cache header's teacher_params)
    reference_pool: list[tuple[str, bytes]] | None = None  # (image id, encoded bytes), for viker
    reference_kind: str = ""
    draw: int = 0  # which of a teacher's `draws` random inputs per sample (Vgid's noise per epoch)

    def sample_seed(self, sample: QASample, seed: int) -> int:
        """A per-sample (and per-draw) seed independent of sharding and batching; draw 0's is the seed
        a cache of one draw uses."""
        key = f"{seed}:{sample.sample_id}"
        if self.draw:
            key = f"{seed}:draw{self.draw}:{sample.sample_id}"
        return stable_int(key, num_bytes=4, byteorder="little")

    @cached_property
    def _decoded_pool(self) -> list[tuple[str, str, Image.Image]]:
        if not self.reference_pool:
            raise TeacherInputError(f"reference pool {self.reference_kind!r} is empty or was not loaded")
        return [
            (
                image_id,
                sha256_hex(data),
                decode_image(data, f"reference image {image_id} of pool {self.reference_kind!r}"),
            )
            for image_id, data in self.reference_pool
        ]

    def reference_images(self, sample: QASample, k: int, seed: int) -> list[tuple[str, str, Image.Image]]:
        """k distinct pool images (id, content hash, image) drawn for this sample; never its own image."""
        own = sha256_hex(sample.image) if sample.image is not None else None
        eligible = [entry for entry in self._decoded_pool if entry[1] != own]
        if len(eligible) < k:
            raise TeacherInputError(
                f"reference pool {self.reference_kind!r} has {len(eligible)} usable images for sample "
                f"{sample.sample_id}, fewer than k={k}"
            )
        return random.Random(self.sample_seed(sample, seed)).sample(eligible, k)

    def prompt(self, sample: QASample, instruction: str | None = None) -> str:
        return self.family.build_prompt(sample.question, sample.image is not None, instruction)

    def perturbed(
        self, sample: QASample, perturbation: str, sigma: float, seed: int
    ) -> tuple[Image.Image, int]:
        sample_seed = self.sample_seed(sample, seed)
        perturb = PERTURBATIONS[perturbation]
        return perturb(sample.pil_image(), np.random.default_rng(sample_seed), sigma), sample_seed


TeacherFunction = Callable[..., TeacherInput]  # (sample, context, *, its arguments)


@dataclass(frozen=True)
class Teacher:
    """A teacher function and what it declares: the stage reads these, never the teacher's name.

    Its arguments are the function's keyword-only parameters. Three names among them carry a meaning the
    stage relies on, read here only: a teacher that draws reference images takes `reference_kind` (the
    pool the stage loads) and `k` (at most the pool's size); one with an instruction takes `icu_prompt`
    (the prompt template in the header shows it); one with random inputs may take `draws` (rows per sample).
    """

    build: TeacherFunction
    reference_pool: bool = False  # draws irrelevant reference images (the stage loads the pool)
    instruction: bool = False  # prepends the in-context unlearning instruction (recorded in the header)
    split_role: str = "forget"  # the split it caches unless told: forget or retain
    unmodified: bool = False  # the unmodified input: its target log-probs are the frozen model's own

    def __call__(self, sample: QASample, context: TeacherContext) -> TeacherInput:
        return self.build(sample, context, **context.arguments)

    def defaults(self) -> dict[str, Any]:
        """Its arguments with their defaults, in declared order (the order of the header's teacher_params)."""
        return declared_arguments(self.build)

    def pool(self, arguments: dict[str, Any]) -> tuple[str, int] | None:
        """(pool kind, images each sample draws) of a teacher that draws reference images, else None."""
        return (arguments["reference_kind"], arguments["k"]) if self.reference_pool else None

    def instruction_text(self, arguments: dict[str, Any]) -> str | None:
        """The in-context unlearning instruction it prepends (Vgid App. A.1), if any."""
        return ICU_PROMPTS[arguments["icu_prompt"]] if self.instruction else None

    def draws(self, arguments: dict[str, Any]) -> int:
        """Rows per sample: a randomised input drawn this many times (Vgid's noise per epoch)."""
        return int(arguments.get("draws", 1))


TEACHERS: Registry[Teacher] = Registry("teacher")


def reference_pool(
    teacher: Teacher, arguments: dict[str, Any], references: str | None, data: str, split: str
) -> tuple[list[tuple[str, bytes]] | None, str]:
    """(pool, kind) of a teacher that draws reference images, loaded from `references` (none: beside
    `data`); (None, "") for the others. Precompute and the online teacher (pipeline.training.online) read
    the same pool through this."""
    drawn = teacher.pool(arguments)
    if drawn is None:
        return None, ""
    kind = drawn[0]
    return load_reference_pool(reference_root(references, data, kind), kind, forget_ratio(split)), kind


def pool_fingerprint(pool: list[tuple[str, bytes]]) -> str:
    """The cache header's reference_pool_fingerprint: every image's id and content."""
    return sha256_hex(repr([[image_id, sha256_hex(data)] for image_id, data in pool]).encode())


def teacher(name: str, **declared: Any) -> Callable[[TeacherFunction], TeacherFunction]:
    """Register a teacher function under `name` with what it declares (see Teacher)."""

    def register(function: TeacherFunction) -> TeacherFunction:
        TEACHERS.register(name)(Teacher(build=function, **declared))
        return function

    return register


def image_key(sample: QASample) -> str | None:
    return f"sha256:{sha256_hex(sample.image)}" if sample.image is not None else None


@teacher("original", unmodified=True)
def original(sample: QASample, context: TeacherContext) -> TeacherInput:
    """The unmodified input."""
    image = sample.pil_image() if sample.image is not None else None
    return TeacherInput(
        variants=[PromptedSample(context.prompt(sample), image, sample.answer)],
        image_sources=[sample.image_source] if image is not None else [],
        image_keys=[image_key(sample)] if image is not None else [],
        intervention="none",
    )


# Vgid Eq. 4 and KL_Min: the frozen model on the retain split, the same computation.
teacher("base", split_role="retain", unmodified=True)(original)


@teacher("viker", reference_pool=True)
def viker(
    sample: QASample, context: TeacherContext, *, k: Count = 5, reference_kind: ReferenceKind = "people",
    seed: int = 0,
) -> TeacherInput:  # fmt: skip
    """ViKeR Eq. 4: the same question with k irrelevant images; R = (1/k) sum_j p(. | I'_j, x)."""
    if sample.image is None:
        return _text_only(original(sample, context))
    sample.pil_image()  # the replaced image must still be a readable image: bad data is never silent
    prompt = context.prompt(sample)
    references = context.reference_images(sample, k, seed)
    return TeacherInput(
        variants=[PromptedSample(prompt, image, sample.answer) for _, _, image in references],
        image_sources=[f"{context.reference_kind}/{image_id}" for image_id, _, _ in references],
        image_keys=[f"sha256:{digest}" for _, digest, _ in references],
        intervention=f"{k} reference images from pool {context.reference_kind!r}",
    )


@teacher("vgid", instruction=True)
def vgid(
    sample: QASample, context: TeacherContext, *, perturbation: Perturbation = "random-noise",
    sigma: Sigma = 0.4, icu_prompt: IcuPrompt = "strict", seed: int = 0, draws: Count = 1,
) -> TeacherInput:  # fmt: skip
    """Vgid Eq. 2: pi_T(y | x_f) = pi_theta0(y | P_phi(v_f), t_ic + t_f). `draws`: noise draws per sample,
    epoch e trains on draw e mod draws (Vgid Alg. 1); `sigma`: the gaussian perturbation's std on [0, 1]."""
    instruction = ICU_PROMPTS[icu_prompt]
    if sample.image is None:
        return TeacherInput(
            variants=[PromptedSample(context.prompt(sample, instruction), None, sample.answer)],
            image_sources=[],
            intervention=f"icu {icu_prompt} (text-only sample: no image to perturb)",
        )
    image, image_seed = context.perturbed(sample, perturbation, sigma, seed)
    return TeacherInput(
        variants=[PromptedSample(context.prompt(sample, instruction), image, sample.answer)],
        image_sources=[f"{perturbation}({sample.image_source})"],
        perturbation_seeds=[image_seed],
        image_keys=[_perturbed_key(perturbation, image)],
        intervention=f"{perturbation} + icu {icu_prompt}",
    )


@teacher("icu", instruction=True)
def icu(sample: QASample, context: TeacherContext, *, icu_prompt: IcuPrompt = "strict") -> TeacherInput:
    """ICU-T: the in-context-unlearning instruction, original image."""
    unmodified = original(sample, context)
    unmodified.variants = [
        PromptedSample(context.prompt(sample, ICU_PROMPTS[icu_prompt]), variant.image, sample.answer)
        for variant in unmodified.variants
    ]
    unmodified.intervention = f"icu {icu_prompt}"
    return unmodified


@teacher("noise")
def noise(
    sample: QASample, context: TeacherContext, *, perturbation: Perturbation = "random-noise",
    sigma: Sigma = 0.4, seed: int = 0, draws: Count = 1,
) -> TeacherInput:  # fmt: skip
    """Noise-T: the perturbed image, original question."""
    if sample.image is None:
        return _text_only(original(sample, context))
    image, image_seed = context.perturbed(sample, perturbation, sigma, seed)
    return TeacherInput(
        variants=[PromptedSample(context.prompt(sample), image, sample.answer)],
        image_sources=[f"{perturbation}({sample.image_source})"],
        perturbation_seeds=[image_seed],
        image_keys=[_perturbed_key(perturbation, image)],
        intervention=perturbation,
    )


def _perturbed_key(perturbation: str, image: Image.Image) -> str | None:
    """White images are all alike (reusable); noise images are unique per sample."""
    if perturbation == "white":
        return f"white:{image.width}x{image.height}"
    return None


def _text_only(teacher_input: TeacherInput) -> TeacherInput:
    teacher_input.intervention = "none: text-only sample"
    return teacher_input


# ---------------------------------------------------------------- params.yaml's teacher entries

ENTRY_KEYS = ("teacher", "args")


class TeacherError(ValueError):
    """A teacher entry or argument that its teacher does not accept; the message names it."""


@dataclass(frozen=True)
class TeacherEntry:
    """One entry of params.yaml's `teachers`: a registered teacher with all its arguments' values."""

    name: str  # the entry's name: its cache is <cache_root>/<name>
    teacher: str  # the registered teacher function
    arguments: dict[str, Any] = field(default_factory=dict)  # declared order (the header's teacher_params)


def _as_declared(function: TeacherFunction, parameter: str, value: Any) -> Any:
    """A whole number given for a float argument as that float (as the command line reads it)."""
    annotation = typing.get_type_hints(function, include_extras=True)[parameter]
    base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation
    return float(value) if base is float and isinstance(value, int) else value


def resolve_teacher(
    name: str, teachers: dict[str, Any], arguments: dict[str, Any] | None = None, where: str = "params.yaml"
) -> TeacherEntry:
    """The entry `name` of params.yaml's `teachers` (or the registered teacher of that name with its
    defaults), its arguments overridden by `arguments`, checked against what the teacher declares."""
    if name == NO_TEACHER:
        raise TeacherError(
            f"{where}: a teacher entry cannot be called {NO_TEACHER!r}: a method slot names no cache so"
        )
    entry = teachers.get(name) if name in teachers else {"teacher": name}
    if not isinstance(entry, dict) or set(entry) - set(ENTRY_KEYS):
        raise TeacherError(f"{where}: teachers.{name} must be a mapping with {', '.join(ENTRY_KEYS)} only")
    chosen = entry.get("teacher") or name
    if chosen not in TEACHERS:
        raise TeacherError(f"{where}: unknown teacher {chosen!r}; known: {', '.join(TEACHERS.names())}")
    if not isinstance(entry.get("args") or {}, dict):
        raise TeacherError(f"{where}: teachers.{name}.args must be a mapping of argument -> value")
    function = TEACHERS[chosen].build
    given = {**(entry.get("args") or {}), **(arguments or {})}
    checked = checked_arguments(
        function, given, f"teacher {chosen!r}", f"{where}: teacher entry {name!r}", TeacherError
    )
    values = {**TEACHERS[chosen].defaults(), **checked}
    return TeacherEntry(
        name, chosen, {key: _as_declared(function, key, value) for key, value in values.items()}
    )

"""Teachers: what the frozen full model is shown so that its answer distribution becomes the target.

A teacher is one function (sample, context) -> TeacherInput, registered by its CLI name. It only
builds model inputs; pipeline.unlearning.extractor runs them, averages the softmaxes of a sample's variants
and truncates. For every teacher the answer is the ground truth, teacher-forced.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image

from pipeline.hashing import sha256_hex, stable_int
from pipeline.models import ModelFamily, PromptedSample
from pipeline.registry import Registry
from pipeline.samples import QASample, decode_image
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
    """Everything a teacher function needs besides the sample."""

    family: ModelFamily
    arguments: dict[str, Any]  # the teacher's declared parameters (Teacher.parameters) and their values
    reference_pool: list[tuple[str, bytes]] | None = None  # (image id, encoded bytes), for viker
    reference_kind: str = ""
    draw: int = 0  # which of a teacher's `draws` random inputs per sample (Vgid's noise per epoch)

    def sample_seed(self, sample: QASample) -> int:
        """A per-sample (and per-draw) seed independent of sharding and batching; draw 0's is the seed
        a cache of one draw uses."""
        key = f"{self.arguments['seed']}:{sample.sample_id}"
        if self.draw:
            key = f"{self.arguments['seed']}:draw{self.draw}:{sample.sample_id}"
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

    def reference_images(self, sample: QASample, k: int) -> list[tuple[str, str, Image.Image]]:
        """k distinct pool images (id, content hash, image) drawn for this sample; never its own image."""
        own = sha256_hex(sample.image) if sample.image is not None else None
        eligible = [entry for entry in self._decoded_pool if entry[1] != own]
        if len(eligible) < k:
            raise TeacherInputError(
                f"reference pool {self.reference_kind!r} has {len(eligible)} usable images for sample "
                f"{sample.sample_id}, fewer than k={k}"
            )
        return random.Random(self.sample_seed(sample)).sample(eligible, k)

    def prompt(self, sample: QASample, instruction: str | None = None) -> str:
        return self.family.build_prompt(sample.question, sample.image is not None, instruction)

    def icu_instruction(self) -> str:
        try:
            return ICU_PROMPTS[self.arguments["icu_prompt"]]
        except KeyError:
            raise TeacherInputError(
                f"unknown --icu-prompt {self.arguments['icu_prompt']!r}; choose from {', '.join(ICU_PROMPTS)}"
            ) from None

    def perturbed(self, sample: QASample) -> tuple[Image.Image, int]:
        seed = self.sample_seed(sample)
        perturb = PERTURBATIONS[self.arguments["perturbation"]]
        return perturb(sample.pil_image(), np.random.default_rng(seed), self.arguments["sigma"]), seed


TeacherFunction = Callable[[QASample, TeacherContext], TeacherInput]


@dataclass(frozen=True)
class Teacher:
    """A teacher function and what it declares: the stage reads these, never the teacher's name."""

    build: TeacherFunction
    parameters: tuple[str, ...] = ()  # the precompute options that change its rows (the cache header's)
    reference_pool: bool = False  # draws irrelevant reference images (the stage loads the pool)
    instruction: bool = False  # prepends the in-context unlearning instruction (recorded in the header)
    split_role: str = "forget"  # the split it caches unless told: forget or retain
    unmodified: bool = False  # the unmodified input: its target log-probs are the frozen model's own

    def __call__(self, sample: QASample, context: TeacherContext) -> TeacherInput:
        return self.build(sample, context)


TEACHERS: Registry[Teacher] = Registry("teacher")


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


@teacher("viker", parameters=("k", "reference_kind", "seed"), reference_pool=True)
def viker(sample: QASample, context: TeacherContext) -> TeacherInput:
    """ViKeR Eq. 4: the same question with k irrelevant images; R = (1/k) sum_j p(. | I'_j, x)."""
    if sample.image is None:
        return _text_only(original(sample, context))
    sample.pil_image()  # the replaced image must still be a readable image: bad data is never silent
    prompt = context.prompt(sample)
    references = context.reference_images(sample, context.arguments["k"])
    return TeacherInput(
        variants=[PromptedSample(prompt, image, sample.answer) for _, _, image in references],
        image_sources=[f"{context.reference_kind}/{image_id}" for image_id, _, _ in references],
        image_keys=[f"sha256:{digest}" for _, digest, _ in references],
        intervention=f"{context.arguments['k']} reference images from pool {context.reference_kind!r}",
    )


@teacher("vgid", parameters=("perturbation", "sigma", "icu_prompt", "seed", "draws"), instruction=True)
def vgid(sample: QASample, context: TeacherContext) -> TeacherInput:
    """Vgid Eq. 2: pi_T(y | x_f) = pi_theta0(y | P_phi(v_f), t_ic + t_f)."""
    instruction = context.icu_instruction()
    if sample.image is None:
        return TeacherInput(
            variants=[PromptedSample(context.prompt(sample, instruction), None, sample.answer)],
            image_sources=[],
            intervention=f"icu {context.arguments['icu_prompt']} (text-only sample: no image to perturb)",
        )
    image, seed = context.perturbed(sample)
    return TeacherInput(
        variants=[PromptedSample(context.prompt(sample, instruction), image, sample.answer)],
        image_sources=[f"{context.arguments['perturbation']}({sample.image_source})"],
        perturbation_seeds=[seed],
        image_keys=[_perturbed_key(context, image)],
        intervention=f"{context.arguments['perturbation']} + icu {context.arguments['icu_prompt']}",
    )


@teacher("icu", parameters=("icu_prompt",), instruction=True)
def icu(sample: QASample, context: TeacherContext) -> TeacherInput:
    """ICU-T: the in-context-unlearning instruction, original image."""
    unmodified = original(sample, context)
    unmodified.variants = [
        PromptedSample(context.prompt(sample, context.icu_instruction()), variant.image, sample.answer)
        for variant in unmodified.variants
    ]
    unmodified.intervention = f"icu {context.arguments['icu_prompt']}"
    return unmodified


@teacher("noise", parameters=("perturbation", "sigma", "seed", "draws"))
def noise(sample: QASample, context: TeacherContext) -> TeacherInput:
    """Noise-T: the perturbed image, original question."""
    if sample.image is None:
        return _text_only(original(sample, context))
    image, seed = context.perturbed(sample)
    return TeacherInput(
        variants=[PromptedSample(context.prompt(sample), image, sample.answer)],
        image_sources=[f"{context.arguments['perturbation']}({sample.image_source})"],
        perturbation_seeds=[seed],
        image_keys=[_perturbed_key(context, image)],
        intervention=context.arguments["perturbation"],
    )


def _perturbed_key(context: TeacherContext, image: Image.Image) -> str | None:
    """White images are all alike (reusable); noise images are unique per sample."""
    if context.arguments["perturbation"] == "white":
        return f"white:{image.width}x{image.height}"
    return None


def _text_only(teacher_input: TeacherInput) -> TeacherInput:
    teacher_input.intervention = "none: text-only sample"
    return teacher_input

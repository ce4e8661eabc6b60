"""One forget answer token by token (ViKeR Fig. 2 / 4): p(y_i) under the evaluated model, and H(R_i), the
entropy of the full model's distribution averaged over irrelevant reference images (ViKeR Eq. 4), which
marks key tokens (Def. 2: H(R_i) >= epsilon). The evaluate stage writes it as token_probs.json; the
report draws it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pipeline.benchmarks import DataError, Layout, load_reference_pool, reference_root
from pipeline.models import PromptedSample, answer_logits, answer_token_ids, encode_answers, prompted
from pipeline.samples import QASample, decode_image

NUM_REFERENCES = 9  # reference images R_i averages over
REFERENCE_KIND = "people"  # ViKeR's irrelevant images: portraits of people in no split


@dataclass
class TokenProbabilities:
    """Per answer token of one sample: its text, H(R_i) (nats; None without reference images) and p(y_i)."""

    sample_id: str
    question: str
    answer: str
    tokens: list[str]
    entropy: list[float] | None
    probabilities: list[float]


def token_sample(data: Layout, forget_split: str, index: int) -> QASample | None:
    """The forget split's image QA sample number `index` (modulo their count); its generation items when
    the split carries no QA; None when it has no image question."""
    samples: list[QASample] = []
    for kinds in (("qa",), ("generation",)):
        try:
            samples = data.unlearning_samples(forget_split, kinds)
            break
        except DataError:  # the benchmark's evaluation folders carry no training QA
            continue
    samples = [sample for sample in samples if sample.image is not None]
    return samples[index % len(samples)] if samples else None


def reference_images(
    references: str | Path | None, data: str | Path, count: int = NUM_REFERENCES
) -> list[Image.Image]:
    """Up to `count` images of the people reference pool, evenly spread; none when no pool is beside the
    data (a `references` folder given without one is an error)."""
    root = reference_root(references, data, REFERENCE_KIND)
    try:
        pool = load_reference_pool(root, REFERENCE_KIND)
    except DataError as error:
        if references:
            raise DataError(f"--references {references}: {error}") from None
        return []
    step = max(1, len(pool) // count)
    return [decode_image(image, f"reference image {name}") for name, image in pool[::step][:count]]


@contextmanager
def full_model(model) -> Iterator[torch.nn.Module]:
    """`model` with its LoRA adapter (if any) switched off for the block, and left exactly as it was."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        yield model
        return
    trainable = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    try:
        with model.disable_adapter():
            yield model
    finally:  # re-enabling an adapter marks its weights trainable: restore the flags as they were
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])


def reference_entropy(
    loaded, model, prompt: str, answer: str, images: Sequence[Image.Image], batch_size: int = 8
) -> list[float]:
    """H(R_i) per answer token, R_i the full model's distribution averaged over the reference images
    (ViKeR Eq. 4) with the same question and answer prefix; `model`'s adapter, if any, is off."""
    total = None
    with torch.inference_mode(), full_model(model) as full:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = encode_answers(loaded, [PromptedSample(prompt, image, answer) for image in chunk])
            probabilities = answer_logits(full, batch.to(loaded.device)).float().softmax(-1)
            summed = torch.stack(batch.per_sample(probabilities)).sum(0)
            total = summed if total is None else total + summed
    average = total / len(images)
    return (-(average * average.clamp_min(1e-30).log()).sum(-1)).tolist()


def answer_probabilities(loaded, model, sample: PromptedSample) -> list[float]:
    """p(y_i | image, question, y_<i) of every ground-truth answer token under `model`."""
    batch = encode_answers(loaded, [sample]).to(loaded.device)
    with torch.inference_mode():
        probabilities = answer_logits(model, batch).float().softmax(-1)
    return probabilities.gather(1, batch.targets[:, None])[:, 0].tolist()


def token_probabilities(
    loaded, model, sample: QASample, references: Sequence[Image.Image], batch_size: int = 8
) -> TokenProbabilities:
    """The sample's answer tokens, H(R_i) under the full model (None without references) and p(y_i)
    under `model`, on the student's own prompt."""
    student = prompted(loaded, sample)
    tokens = [loaded.tokenizer.decode([token]) for token in answer_token_ids(loaded, sample.answer)]
    entropy = (
        reference_entropy(loaded, model, student.prompt, sample.answer, references, batch_size)
        if references
        else None
    )
    probabilities = answer_probabilities(loaded, model, student)
    return TokenProbabilities(
        sample.sample_id, sample.question, sample.answer, tokens, entropy, probabilities
    )

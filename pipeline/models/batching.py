"""Teacher-forced batches: prompts + answers, LEFT-padded so that every answer ends at the last position.

Then the logits of all answer tokens lie in the last `max_answer_len + 1` positions and `logits_to_keep`
sends only those through the output layer (the vocabulary projection is most of the cost of a long
teacher-forced pass), while the forward pass still goes through the model's own `forward` (so DDP and
PEFT wrappers work unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from pipeline.models.family import PromptedSample
from pipeline.models.loading import LoadedModel
from pipeline.samples import QASample


def answer_token_ids(loaded: LoadedModel, answer: str) -> list[int]:
    """The answer's token ids as teacher forcing sees them (closing token included)."""
    if not answer.strip():
        raise ValueError("empty answer")
    ids = loaded.tokenizer(loaded.family.answer_text(answer), add_special_tokens=False)["input_ids"]
    return list(ids) + (loaded.family.end_token_ids(loaded.tokenizer) if loaded.close_answers else [])


def prompted(loaded: LoadedModel, sample: QASample, answer: str | None = None) -> PromptedSample:
    """The student's input: the sample's own image and question, teacher-forced on `answer`."""
    has_image = sample.image is not None
    return PromptedSample(
        prompt=loaded.family.build_prompt(sample.question, has_image),
        image=sample.pil_image() if has_image else None,
        answer=sample.answer if answer is None else answer,
    )


def prompt_token_counts(loaded: LoadedModel, samples: list[PromptedSample]) -> list[int]:
    """Each prompt's length in tokens as the model reads it: its text tokens plus its images' tokens (576
    per image for LLaVA-1.5, size-dependent for Qwen), which characters do not show."""
    if not samples:
        return []
    texts = loaded.tokenizer([sample.prompt for sample in samples])["input_ids"]
    return [
        len(ids) + sum(loaded.family.image_token_count(loaded.processor, image) for image in sample.images)
        for ids, sample in zip(texts, samples, strict=True)
    ]


@dataclass
class TeacherForcingBatch:
    """A left-padded batch of prompt + answer sequences and where their answer logits are.

    `predict_positions` index the flattened (B * window) logits that `answer_logits` returns
    before selection; `targets` are the answer token ids in the same order.
    """

    inputs: dict[str, torch.Tensor]
    predict_positions: torch.Tensor
    targets: torch.Tensor
    answer_lengths: list[int]
    window: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> TeacherForcingBatch:
        moved = {
            name: _to_device(value, device) if isinstance(value, torch.Tensor) else value
            for name, value in self.inputs.items()
        }
        return TeacherForcingBatch(
            inputs=moved,
            predict_positions=_to_device(self.predict_positions, device),
            targets=_to_device(self.targets, device),
            answer_lengths=self.answer_lengths,
            window=self.window,
            extra=self.extra,
        )

    def per_sample(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(flat, self.answer_lengths))

    @property
    def sample_index(self) -> torch.Tensor:
        """(N,) which sample each answer token belongs to."""
        return _sample_of_token(torch.tensor(self.answer_lengths, device=self.targets.device))


def _sample_of_token(lengths: torch.Tensor) -> torch.Tensor:
    """(sum(lengths),) the index of the sample each token of the concatenated answers belongs to."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)


def _to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host-to-GPU copies from pinned memory, so that they run asynchronously to the host."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids) :] = 1
    return input_ids, attention_mask


def _encode_model_inputs(
    loaded: LoadedModel, prompts: list[str], images: list[Image.Image], suffixes: list[list[int]]
) -> dict[str, torch.Tensor]:
    encoded = loaded.family.encode_prompts(loaded.processor, prompts, images)
    return _padded_inputs(loaded, encoded, suffixes)


def _padded_inputs(
    loaded: LoadedModel, encoded: dict[str, Any], suffixes: list[list[int]]
) -> dict[str, torch.Tensor]:
    """encode_prompts' output with each prompt's `suffix` appended, left-padded into model inputs."""
    encoded = dict(encoded)
    sequences = [ids + suffix for ids, suffix in zip(encoded.pop("input_ids"), suffixes, strict=True)]
    pad_id = loaded.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = loaded.tokenizer.eos_token_id
    input_ids, attention_mask = _left_pad(sequences, pad_id)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **encoded}
    inputs.update(loaded.family.extra_inputs(input_ids, attention_mask))
    return inputs


def _checked_answer_ids(loaded: LoadedModel, sample: PromptedSample) -> list[int]:
    if sample.answer is None:
        raise ValueError(f"teacher forcing needs an answer; prompt {sample.prompt[:60]!r} has none")
    return answer_token_ids(loaded, sample.answer)


def encode_answers(loaded: LoadedModel, samples: list[PromptedSample]) -> TeacherForcingBatch:
    """Tokenize prompts + ground-truth answers for one teacher-forced pass."""
    answers = [_checked_answer_ids(loaded, sample) for sample in samples]
    images = [image for sample in samples for image in sample.images]
    inputs = _encode_model_inputs(loaded, [s.prompt for s in samples], images, answers)
    return _teacher_forcing_batch(inputs, answers)


def _teacher_forcing_batch(inputs: dict[str, torch.Tensor], answers: list[list[int]]) -> TeacherForcingBatch:
    lengths = torch.tensor([len(ids) for ids in answers], dtype=torch.long)
    # Keep the last (max_len + 1) positions: position t predicts token t + 1, so the logits of an
    # answer of length n sit at window offsets window - 1 - n ... window - 2.
    window = int(lengths.max()) + 1
    sample_of_token = _sample_of_token(lengths)
    first_token = torch.cumsum(lengths, 0) - lengths
    offset_in_answer = torch.arange(int(lengths.sum())) - first_token[sample_of_token]
    positions = sample_of_token * window + (window - 1 - lengths[sample_of_token]) + offset_in_answer
    return TeacherForcingBatch(
        inputs=inputs,
        predict_positions=positions,
        targets=torch.cat([torch.tensor(ids, dtype=torch.long) for ids in answers]),
        answer_lengths=lengths.tolist(),
        window=window,
    )


def answer_logits(model: torch.nn.Module, batch: TeacherForcingBatch, **model_kwargs: Any) -> torch.Tensor:
    """(N, V) logits at the answer positions only; works through PEFT and DDP wrappers."""
    return answer_outputs(model, batch, **model_kwargs)[0]


def answer_outputs(
    model: torch.nn.Module, batch: TeacherForcingBatch, hidden_states: bool = False, **model_kwargs: Any
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """(N, V) logits at the answer positions and, if asked, each layer's (N, d) hidden states there
    (index 0: the embeddings, l: after l decoder layers, as transformers' `hidden_states`)."""
    outputs = model(
        **batch.inputs,
        logits_to_keep=batch.window,
        use_cache=False,
        output_hidden_states=hidden_states,
        **model_kwargs,
    )
    logits = outputs.logits
    selected = logits.reshape(-1, logits.shape[-1])[batch.predict_positions]
    if not hidden_states:
        return selected, None
    window = batch.window
    layers = tuple(
        layer[:, -window:, :].reshape(-1, layer.shape[-1])[batch.predict_positions]
        for layer in outputs.hidden_states
    )
    return selected, layers


@torch.no_grad()
def answer_token_log_probs(
    loaded: LoadedModel, model: torch.nn.Module, inputs: list[PromptedSample], batch_size: int = 8
) -> list[torch.Tensor]:
    """Per PromptedSample, the (|y|,) log p(y_i | I, x, y_<i) under `model`, teacher-forced, in float32."""
    values: list[torch.Tensor] = []
    for start in range(0, len(inputs), batch_size):
        batch = encode_answers(loaded, inputs[start : start + batch_size]).to(loaded.device)
        log_probs = torch.log_softmax(answer_logits(model, batch).float(), -1)
        picked = log_probs.gather(1, batch.targets[:, None]).squeeze(1).cpu()
        values += list(torch.split(picked, batch.answer_lengths))
    return values


def check_lengths(loaded: LoadedModel, batch: TeacherForcingBatch, samples: list) -> None:
    """Refuse a sequence (prompt + image tokens + answer) longer than the model's context, naming its
    sample (anything with `sample_id` and `answer`), before it runs: the model would silently misread it."""
    config = loaded.model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit is None:
        return
    for sample, length in zip(samples, batch.inputs["attention_mask"].sum(dim=1).tolist(), strict=True):
        if length > limit:
            raise ValueError(
                f"sample {sample.sample_id}: prompt + image tokens + answer are {length} tokens, more than "
                f"the model's limit of {limit} (answer: {sample.answer[:60]!r}...)"
            )


class TokenizationError(ValueError):
    """The answer's tokens differ when the prompt and answer are tokenized together and apart."""


def check_joint_tokenization(
    loaded: LoadedModel, sample_id: str, prompt: str, answer: str, what: str = "sample"
) -> None:
    """Teacher forcing tokenizes the answer apart from the prompt; refuse a tokenizer for which the answer's
    tokens then differ from those of the joint text (a legacy SentencePiece tokenizer inserts a spurious
    "▁" at the start of a separately tokenized text), naming the sample (or `what` it is) and both token
    lists."""
    tokenizer = loaded.tokenizer
    answer_ids = tokenizer(loaded.family.answer_text(answer), add_special_tokens=False)["input_ids"]
    joint_ids = tokenizer(prompt + loaded.family.answer_text(answer), add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if list(joint_ids) != list(prompt_ids) + list(answer_ids):
        joint_answer = list(joint_ids[len(prompt_ids) :])
        raise TokenizationError(
            f"{what} {sample_id}: the answer {answer[:40]!r} tokenizes as {list(answer_ids)[:8]} on its own but "
            f"as {joint_answer[:8]} after the prompt: this tokenizer does not split prompt and answer cleanly "
            "(a legacy SentencePiece tokenizer? load it with legacy=False)"
        )

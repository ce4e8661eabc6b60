"""The model adapter layer: loading, prompts, teacher-forced answer logits and generation.

Every stage talks to a vision-language model only through this module. A model family (registered
by the config's `model_type`) knows its prompt format, where the image tokens go, how answers end
and which modules LoRA targets; the rest is shared.

Batches are LEFT-padded so that every answer ends at the last position. Then the logits of all
answer tokens lie in the last `max_answer_len + 1` positions and `logits_to_keep` sends only those
through the output layer (the vocabulary projection is most of the cost of a long teacher-forced
pass), while the forward pass still goes through the model's own `forward` (so DDP and PEFT wrappers
work unchanged).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from inspect import signature
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pipeline.registry import Registry

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The command line's --attn-implementation / --trust-remote-code reach every stage's load_model
# through these variables (pipeline.cli sets them), so no stage config has to carry them.
ATTN_IMPLEMENTATION_ENV = "PIPELINE_ATTN_IMPLEMENTATION"
TRUST_REMOTE_CODE_ENV = "PIPELINE_TRUST_REMOTE_CODE"


@dataclass
class PromptedSample:
    """One model input: a full prompt (image placeholders included), its images, an optional answer.

    `context_images` belong to placeholders that come before the main image's in the prompt
    (few-shot exemplars precede the query), so the images go in as [*context_images, image].
    """

    prompt: str
    image: Image.Image | None
    answer: str | None = None
    context_images: tuple[Image.Image, ...] = ()

    @property
    def images(self) -> list[Image.Image]:
        return [*self.context_images, *([self.image] if self.image is not None else [])]


class ModelFamily:
    """What differs between architectures. Subclasses register under the config's model_type."""

    name = "base"
    image_placeholder = "<image>"
    # LoRA goes on the language model's attention only: the vision tower has q_proj/v_proj too.
    lora_target_modules = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"

    def __init__(self, config: Any = None) -> None:
        # The model's config (load_model passes it): token ids some families need, e.g. Qwen's image pad.
        self.config = config

    def load_processor(self, model_dir: str, trust_remote_code: bool = False) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)

    def build_prompt(
        self, question: str, has_image: bool, instruction: str | None = None, exemplars: str = ""
    ) -> str:
        """The model's prompt for one question; `exemplars` is a solved few-shot block put where the
        family's format wants it (its image placeholders are matched by `PromptedSample.context_images`)."""
        raise NotImplementedError

    def answer_text(self, answer: str) -> str:
        """The text that follows the prompt when the model gives `answer`."""
        raise NotImplementedError

    def end_token_ids(self, tokenizer) -> list[int]:
        """Tokens that close an answer (appended when teacher forcing)."""
        return [tokenizer.eos_token_id]

    def encode_prompts(self, processor, prompts: list[str], images: list[Image.Image]) -> dict[str, Any]:
        """Tokenize prompts (image placeholders expanded) and preprocess images, unpadded.

        Returns {"input_ids": list[list[int]], plus image tensors such as "pixel_values"}.
        """
        encoded = processor(text=prompts, images=images or None, padding=False)
        result = {"input_ids": [list(ids) for ids in encoded["input_ids"]]}
        if images:
            result["pixel_values"] = torch.as_tensor(np.stack(encoded["pixel_values"]))
        return result

    def extra_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Family-specific tensors beside input_ids/attention_mask (e.g. position ids)."""
        # Left padding shifts positions: give each real token the position it has unpadded,
        # so a sample's logits do not depend on what it was batched with.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return {"position_ids": position_ids}


FAMILIES: Registry[type[ModelFamily]] = Registry("model family")


@FAMILIES.register("llava")
class LlavaFamily(ModelFamily):
    """LLaVA-1.5 (`llava-hf/llava-1.5-7b-hf` and the tiny mini-world model)."""

    name = "llava"

    def build_prompt(
        self, question: str, has_image: bool, instruction: str | None = None, exemplars: str = ""
    ) -> str:
        text = f"{instruction}\n{question}" if instruction else question
        # MLLMU-Bench's eval.py puts the solved exemplars in front of the whole "USER: ..." turn.
        turn = f"USER: <image>\n{text} ASSISTANT:" if has_image else f"USER: {text} ASSISTANT:"
        return exemplars + turn

    def answer_text(self, answer: str) -> str:
        return " " + answer


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: Any
    family: ModelFamily
    model_fingerprint: str
    tokenizer_fingerprint: str
    path: str

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def model_fingerprint(path: str | Path) -> str:
    """sha256 over config.json and the weight files, so a cache can name the exact model it came from."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path / "config.json"] + sorted(
        p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"} and p.is_file()
    )
    for file in files:
        if not file.exists():
            raise FileNotFoundError(f"model directory {path} has no {file.name}")
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary and special tokens: equal exactly when token ids mean the same text."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {"eos": tokenizer.eos_token, "bos": tokenizer.bos_token, "pad": tokenizer.pad_token}
    payload = json.dumps({"vocab": vocabulary, "special": special}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def resolve_model_dir(path: str) -> str:
    """A local directory as is; a hub id through the local HF cache (downloads only when online)."""
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path)


def load_model(
    path: str,
    dtype: str = "fp32",
    device: str = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool | None = None,
) -> LoadedModel:
    """Load a vision-language model and its processor, frozen and in eval mode."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if attn_implementation is None:
        attn_implementation = os.environ.get(ATTN_IMPLEMENTATION_ENV) or None
    if trust_remote_code is None:
        trust_remote_code = os.environ.get(TRUST_REMOTE_CODE_ENV) == "1"
    local_dir = resolve_model_dir(path)
    config = AutoConfig.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    family = FAMILIES[config.model_type](config)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(local_dir, **kwargs).to(device).eval()
    model.requires_grad_(False)
    processor = family.load_processor(local_dir, trust_remote_code=trust_remote_code)
    processor.tokenizer.padding_side = "left"
    return LoadedModel(
        model=model,
        processor=processor,
        family=family,
        model_fingerprint=model_fingerprint(local_dir),
        tokenizer_fingerprint=tokenizer_fingerprint(processor.tokenizer),
        path=str(path),
    )


def answer_token_ids(loaded: LoadedModel, answer: str) -> list[int]:
    """The answer's token ids as teacher forcing sees them (closing token included)."""
    if not answer.strip():
        raise ValueError("empty answer")
    ids = loaded.tokenizer(loaded.family.answer_text(answer), add_special_tokens=False)["input_ids"]
    return list(ids) + loaded.family.end_token_ids(loaded.tokenizer)


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


class EncodedSamples:
    """Each input's prompt tokens, image tensors and answer tokens, encoded once and reused.

    Training asks the same samples every epoch, and tokenizing and preprocessing them again at every
    step costs 3.5 ms of a 25 ms mini-model step at batch 2 (0.6 ms from memory; README "Measured").
    The caller names each input by a key that identifies it completely (its image, question and answer;
    training uses the QASample itself with the answer text) and gives a function that builds the input:
    it runs only for keys not stored, so a stored input is neither rebuilt nor its image decoded.
    A batch built from the entries equals `encode_answers` on the same inputs: prompts are encoded
    one at a time, and the families' image tensors (one row per image or per image patch) concatenate
    along their first dimension in input order, as a batched processor call lays them out.
    """

    def __init__(self, loaded: LoadedModel, max_bytes: int = 1 << 30) -> None:
        # Bounded by size, not count: a real model's preprocessed image is over a megabyte (LLaVA-1.5 at
        # 336 px: 1.35 MB), so a retain set of thousands must not all stay in memory. Once full it keeps
        # what it holds and encodes the rest at every use: an epoch reads every sample once, in a new
        # order, and under that scan evicting the least recently used entry mostly evicts the ones about
        # to come (half the data fitting: 15% of uses hit under LRU, 50% kept this way; simulated).
        self.loaded = loaded
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: dict[Hashable, dict[str, Any]] = {}

    def batch(self, keys: list[Hashable], build: Callable[[int], PromptedSample]) -> TeacherForcingBatch:
        """The teacher-forced batch of inputs 0..len(keys)-1; build(i) makes input i when keys[i] is new."""
        entries = []
        for index, key in enumerate(keys):
            entry = self.entries.get(key)
            entries.append(entry if entry is not None else self._encode(key, build(index)))
        encoded: dict[str, Any] = {"input_ids": [entry["input_ids"] for entry in entries]}
        for name in dict.fromkeys(name for entry in entries for name in entry["images"]):
            encoded[name] = torch.cat([entry["images"][name] for entry in entries if name in entry["images"]])
        answers = [entry["answer_ids"] for entry in entries]
        return _teacher_forcing_batch(_padded_inputs(self.loaded, encoded, answers), answers)

    def _encode(self, key: Hashable, sample: PromptedSample) -> dict[str, Any]:
        encoded = self.loaded.family.encode_prompts(self.loaded.processor, [sample.prompt], sample.images)
        entry = {
            "input_ids": encoded.pop("input_ids")[0],
            "images": encoded,
            "answer_ids": _checked_answer_ids(self.loaded, sample),
        }
        entry["bytes"] = 8 * (len(entry["input_ids"]) + len(entry["answer_ids"])) + sum(
            tensor.nbytes for tensor in encoded.values()
        )
        if self.bytes + entry["bytes"] <= self.max_bytes:
            self.entries[key] = entry
            self.bytes += entry["bytes"]
        return entry


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
    outputs = model(**batch.inputs, logits_to_keep=batch.window, use_cache=False, **model_kwargs)
    logits = outputs.logits
    return logits.reshape(-1, logits.shape[-1])[batch.predict_positions]


class VisionFeatureCache:
    """Vision-tower features by image content key, so an image is encoded once per run.

    Stage one reuses a reference image's features across samples; training reuses the student's image
    features across steps and epochs (valid while the vision tower and projector are frozen: LoRA on the
    language model only). Works for models whose forward accepts `mm_encoder_outputs` with one pixel
    tensor per image (LLaVA); for others (e.g. Qwen2-VL's packed patches) it steps aside and the model
    encodes as usual. Bounded by size (LLaVA-1.5-7B: 576 x 4096 values, 4.7 MB per image in bf16, kept
    on the model's device); once full it keeps what it holds and encodes other images at every use, as
    EncodedSamples does, for the same reason (an epoch is a shuffled scan).
    """

    def __init__(self, model: torch.nn.Module, max_bytes: int = 4 << 30) -> None:
        inner = getattr(model, "model", None)
        self.encoder = getattr(inner, "get_image_features", None)
        self.enabled = (
            self.encoder is not None and "mm_encoder_outputs" in signature(model.forward).parameters
        )
        self.max_bytes = max_bytes
        self.bytes = 0
        self.features: dict[str, Tensor] = {}
        self.encoded = self.reused = 0

    def model_kwargs(self, inputs: dict[str, Tensor], keys: list[str | None]) -> dict[str, Any]:
        """Replace inputs['pixel_values'] by cached/fresh features; {} when not applicable."""
        pixel_values = inputs.get("pixel_values")
        if (
            not self.enabled
            or pixel_values is None
            or pixel_values.dim() != 4
            or pixel_values.shape[0] != len(keys)
            or "image_sizes" in inputs
        ):
            return {}
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # Encode each image not kept, once per batch (an unkeyed image every time).
        first_of_key: dict[str, int] = {}
        to_encode = []
        for position, key in enumerate(keys):
            if key is None or (key not in self.features and key not in first_of_key):
                to_encode.append(position)
                if key is not None:
                    first_of_key[key] = position
        fresh: dict[int, Tensor] = {}
        if to_encode:
            with torch.no_grad():  # frozen tower: nothing to differentiate, and no graph kept in the cache
                output = self.encoder(pixel_values=pixel_values[to_encode], return_dict=True).pooler_output
            fresh = dict(zip(to_encode, output, strict=True))
        features = []
        for position, key in enumerate(keys):
            if position in fresh:
                feature = fresh[position]
                if key is not None:
                    self._keep(key, feature)
                self.encoded += 1
            else:
                feature = self.features[key] if key in self.features else fresh[first_of_key[key]]
                self.reused += 1
            features.append(feature)
        del inputs["pixel_values"]
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}

    def clear(self) -> None:
        self.features.clear()
        self.bytes = 0

    def _keep(self, key: str, value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if self.bytes + size <= self.max_bytes:
            self.features[key] = value
            self.bytes += size


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    samples: list[PromptedSample],
    max_new_tokens: int = 50,
    batch_size: int = 8,
    progress: bool = False,
    description: str = "generate",
    model: torch.nn.Module | None = None,
) -> list[str]:
    """Greedy decoding; returns only the newly generated text of each sample."""
    from tqdm.auto import tqdm

    model = model if model is not None else loaded.model
    device = next(model.parameters()).device
    replies: list[str] = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc=description, disable=not progress, unit="batch"):
        chunk = samples[start : start + batch_size]
        images = [image for sample in chunk for image in sample.images]
        inputs = _encode_model_inputs(loaded, [s.prompt for s in chunk], images, [[] for _ in chunk])
        inputs.pop("position_ids", None)  # generate derives positions from the attention mask
        inputs = {name: value.to(device) for name, value in inputs.items()}
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
            eos_token_id=loaded.family.end_token_ids(loaded.tokenizer),
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        replies.extend(loaded.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return replies


# Families defined in their own modules register on import.
from pipeline import qwen_family  # noqa: E402,F401

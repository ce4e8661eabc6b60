"""Loading a model with its processor and family, frozen, and the fingerprints that name it exactly."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.hashing import cached_files_sha256_each, sha256_hex
from pipeline.models.family import FAMILIES, ModelFamily
from pipeline.models.llava import LlavaFamily
from pipeline.models.qwen2_vl import Qwen2VLFamily

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REGISTERED_FAMILIES = (LlavaFamily, Qwen2VLFamily)  # importing them registers every family


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: Any
    family: ModelFamily
    model_fingerprint: str
    tokenizer_fingerprint: str
    path: str
    close_answers: bool = True  # teacher forcing appends the family's closing token to every answer
    model_parts: dict[str, dict[str, str]] = field(default_factory=dict)  # fingerprinted_model's parts

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# How a model turns an image into pixels is part of what it computes: another image_mean gives other
# probabilities from the same weights, so these files are fingerprinted with the weights.
PREPROCESSING_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def model_fingerprint(path: str | Path, processor_path: str | Path | None = None) -> str:
    """sha256 over config.json, the weight files and the image preprocessing configs, so a cache can name
    the exact model (and preprocessing) it came from."""
    return fingerprinted_model(path, processor_path)[0]


def fingerprinted_model(
    path: str | Path, processor_path: str | Path | None = None
) -> tuple[str, dict[str, dict[str, str]]]:
    """model_fingerprint, and its parts: {"config" | "weights" | "preprocessing": {file name: sha256}}, so a
    refusal can name what differs (the fingerprint itself is unchanged: old caches still match). The
    preprocessing files are those of `processor_path` where the processor comes from another folder.

    Read once per model: the result is kept by each file's path, size and times (pipeline.hashing), so
    the ~35 stage processes of a run hash a 14 GB checkpoint once, not each."""
    path = Path(path)
    weights = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"} and p.is_file())
    processor_dir = Path(processor_path or path)
    preprocessing = [processor_dir / name for name in PREPROCESSING_FILES if (processor_dir / name).is_file()]
    files = [path / "config.json", *weights, *preprocessing]
    for file in files:
        if not file.exists():
            raise FileNotFoundError(f"model directory {path} has no {file.name}")
    fingerprint, each = cached_files_sha256_each(files)
    groups = {"config": files[:1], "weights": weights, "preprocessing": preprocessing}
    return fingerprint, {
        part: {file.name: each[file.name] for file in group} for part, group in groups.items()
    }


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary and special tokens: equal exactly when token ids mean the same text."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {"eos": tokenizer.eos_token, "bos": tokenizer.bos_token, "pad": tokenizer.pad_token}
    payload = json.dumps({"vocab": vocabulary, "special": special}, ensure_ascii=False)
    return sha256_hex(payload.encode())


def resolve_model_dir(path: str) -> str:
    """A local directory as is; a hub id through the local HF cache (downloads only when online).

    A path that is neither, or a hub id the offline cache lacks, is a FileNotFoundError that names it.
    """
    if Path(path).is_dir():
        return path
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    looks_local = Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local:
        raise FileNotFoundError(
            f"--model {path}: no such model directory (nor a hub id of the form owner/name)"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path)
    except Exception as error:  # the hub library raises several types for "not there"
        where = (
            "the hub is offline (HF_HUB_OFFLINE=1) and its local cache lacks it" if offline else str(error)
        )
        raise FileNotFoundError(
            f"--model {path}: no such local directory, and as a hub id: {where}"
        ) from error


def load_model(
    path: str,
    dtype: str = "fp32",
    device: str = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    close_answers: bool = True,
    prompt_template: str | None = None,
    processor_from: str | None = None,
    max_pixels: int | None = None,
) -> LoadedModel:
    """Load a vision-language model and its processor, frozen and in eval mode.

    max_pixels: resize no image beyond this area (dynamic-resolution families; None: the checkpoint's).

    attn_implementation: None keeps transformers' choice. trust_remote_code runs code shipped with a hub
    checkpoint, so it is off unless a stage's config asks for it. processor_from: the folder or hub id
    whose tokenizer and processor go with these weights (a checkpoint saved without them, e.g.
    MLLMU-Bench's fine-tuned LLaVA: llava-hf's); None: the model's own.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    local_dir = resolve_model_dir(path)
    config = AutoConfig.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    family = FAMILIES[config.model_type](config, prompt_template)
    # safetensors only: a pickled checkpoint can run code when it is loaded.
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[dtype],
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    kwargs.update(placement(device))
    model = AutoModelForImageTextToText.from_pretrained(local_dir, **kwargs)
    if "device_map" not in kwargs:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    processor_dir = resolve_model_dir(processor_from) if processor_from else local_dir
    if processor_from:
        print(
            f"model {path}: tokenizer and processor from {processor_from} (model.processor_from)",
            file=sys.stderr,
        )
    processor = checked_processor(family, config, processor_dir, processor_from, trust_remote_code)
    family.check_processor(processor, config, processor_dir, model.get_input_embeddings().num_embeddings)
    processor.tokenizer.padding_side = "left"
    family.cap_pixels(processor, max_pixels)
    fingerprint, parts = fingerprinted_model(local_dir, processor_dir)
    return LoadedModel(
        model=model,
        processor=processor,
        family=family,
        model_fingerprint=fingerprint,
        tokenizer_fingerprint=tokenizer_fingerprint(processor.tokenizer),
        path=str(path),
        close_answers=close_answers,
        model_parts=parts,
    )


def checked_processor(
    family: ModelFamily, config, processor_dir: str, processor_from: str | None, trust_remote_code: bool
):
    """The family's processor from processor_dir; a folder without one (weights saved alone) is an error
    that says where to take it from."""
    try:
        return family.load_processor(processor_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as error:
        if processor_from:
            raise
        raise ValueError(
            f"model {processor_dir}: no usable tokenizer/processor files ({type(error).__name__}: {error}); "
            f"a checkpoint saved without them (e.g. MLLMU-Bench's fine-tuned LLaVA) takes its base model's: "
            f"set model.processor_from to it (e.g. {family.base_model_hint})"
        ) from error


def placement(device: str) -> dict[str, Any]:
    """from_pretrained's keyword for where the weights go: an accelerator's weights load straight onto it
    (a 7B model in bf16 would otherwise sit in 14 GB of host RAM first, per process under torchrun); on
    the CPU, nothing (transformers' plain load). transformers needs accelerate for device_map (a dependency,
    and peft's)."""
    target = torch.device(device)
    if target.type == "cpu":
        return {}
    if target.index is None and target.type == "cuda":
        target = torch.device("cuda", torch.cuda.current_device())  # "cuda" means the current device
    return {"device_map": {"": str(target)}}


def decoder_layers(model) -> int:
    """The language model's number of decoder layers, from its config."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text_config.num_hidden_layers

"""LoRA adapters on a loaded model: refused when trained on another base model or tokenizer.

The train stage writes training_meta.json with the base model's and tokenizer's fingerprints beside the
PEFT files; evaluation, the relearning attack and the report load adapters only through here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.hashing import differing_parts
from pipeline.models.masked_delta import drop_masked_deltas, fold_masked_deltas, load_masked_deltas


class AdapterMismatchError(ValueError):
    """The adapter was trained on another base model (or tokenizer) than the one given."""


def check_adapter(loaded, adapter_dir: str | Path) -> str:
    """Refuse an adapter trained on another base model or tokenizer; returns the base model it names.

    The train stage writes training_meta.json with the base model's and tokenizer's fingerprints; an
    adapter without it (trained elsewhere) is checked by the base model path its adapter_config names.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"--adapter {adapter_dir}: no adapter_config.json (not a PEFT adapter directory)"
        )
    if not (adapter_dir / "adapter_model.safetensors").is_file():  # a pickled .bin can run code when loaded
        raise FileNotFoundError(
            f"--adapter {adapter_dir}: no adapter_model.safetensors (only safetensors are loaded)"
        )
    base_name = json.loads(config_path.read_text()).get("base_model_name_or_path") or "?"
    meta_path = adapter_dir / "training_meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        for key, ours in (("model_fingerprint", loaded.model_fingerprint),
                          ("tokenizer_fingerprint", loaded.tokenizer_fingerprint)):  # fmt: skip
            theirs = meta.get(key)
            if theirs and theirs != ours:
                recorded, given = meta.get("model_parts"), getattr(loaded, "model_parts", None)
                parts = differing_parts(recorded, given) if recorded and given else []  # older metas lack it
                differs = (
                    f"; what differs: {'; '.join(parts)}" if key == "model_fingerprint" and parts else ""
                )
                raise AdapterMismatchError(
                    f"adapter {adapter_dir} was trained on base model {meta.get('model', base_name)} "
                    f"({key} {theirs[:12]}), but --model {loaded.path} has {key} {ours[:12]}{differs}"
                )
    elif Path(base_name).resolve() != Path(loaded.path).resolve():
        print(
            f"warning: adapter {adapter_dir} names base model {base_name}, evaluating on {loaded.path}; "
            "it has no training_meta.json fingerprint to confirm they are the same model",
            file=sys.stderr,
        )
    return base_name


def load_adapter(loaded, adapter_dir: str | Path, trainable: bool = False):
    """The loaded model wrapped with a checked LoRA adapter: a PeftModel in eval mode, or with its LoRA
    weights trainable (training on from an adapter, e.g. the relearning attack)."""
    from peft import PeftModel

    base_name = check_adapter(loaded, adapter_dir)
    with fitting(loaded, adapter_dir, base_name):
        model = PeftModel.from_pretrained(loaded.model, str(adapter_dir), is_trainable=trainable)
        load_masked_deltas(model, adapter_dir, model.active_adapter)
    return model if trainable else model.eval()


@contextmanager
def fitting(loaded, adapter_dir: str | Path, base_name: str):
    """PEFT's error for weights of the wrong shape, as one naming the adapter and the model."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError) as error:
        raise AdapterMismatchError(
            f"adapter {adapter_dir} (trained on {base_name}) does not fit --model {loaded.path}: {error}"
        ) from error


def switch_adapter(loaded, model, adapter_dir: str | Path, name: str):
    """`model` (the loaded model, or a PeftModel on it) with a checked adapter loaded as `name` and made the
    active one, in eval mode: models that differ only in their adapter share one copy of the base weights."""
    from peft import PeftModel

    base_name = check_adapter(loaded, adapter_dir)
    with fitting(loaded, adapter_dir, base_name):
        if not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(loaded.model, str(adapter_dir), adapter_name=name)
        else:
            model.load_adapter(str(adapter_dir), adapter_name=name)
        load_masked_deltas(model, adapter_dir, name)
    model.set_adapter(name)
    return model.eval()


def replace_adapter(loaded, model, adapter_dir: str | Path, name: str):
    """switch_adapter, then every other adapter deleted: the next run's model is this one alone on the
    same base weights (evaluating several runs loads the base model once)."""
    model = switch_adapter(loaded, model, adapter_dir, name)
    for other in [other for other in model.peft_config if other != name]:
        model.delete_adapter(other)
    drop_masked_deltas(model, keep=name)
    return model


@contextmanager
def merged(model: torch.nn.Module, merge: bool = True) -> Iterator[torch.nn.Module]:
    """For the block, `model`'s base model with its active LoRA adapter merged into the weights and the LoRA
    layers out of the forward pass (what PEFT's merge_and_unload gives: no extra matmul per layer and
    token); afterwards the PeftModel is as it was, its base weights restored bit for bit from a host copy
    (unmerging in bfloat16 would not give them back). Without an adapter, or with `merge` off: `model`."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not merge or not isinstance(model, PeftModel):
        yield model
        return
    base = model.get_base_model()
    layers = [(name, module) for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)]
    saved = {name: module.get_base_layer().weight.detach().to("cpu", copy=True) for name, module in layers}
    try:
        for name, module in layers:
            module.merge()  # the active adapters, where this layer has them
            fold_masked_deltas(module)  # MMUnlearner's forget update, beside LoRA
            _replace_module(base, name, module.get_base_layer())
        yield base
    finally:
        for name, module in layers:
            _replace_module(base, name, module)
            if module.merged:
                module.unmerge()
            module.get_base_layer().weight.data.copy_(saved[name])


def _replace_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)

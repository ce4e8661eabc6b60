"""What a training run read and wrote, for its skip, its resume and its training_meta.json: the run's
signature (config and resolved method), the fingerprints of what it read, the meta of a completed run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.arguments import public_name
from pipeline.benchmarks import samples_fingerprint
from pipeline.hashing import files_sha256
from pipeline.training.checkpoints import Position
from pipeline.training.inputs import Setup
from pipeline.training.processes import Processes
from pipeline.training.streams import Cache
from pipeline.unlearning.methods import Method

META = "training_meta.json"


def finished_meta(out: Path, config: Any, method: Method) -> dict[str, Any] | None:
    """training_meta of a completed run with the same settings at `out` (adapter written), or None; the
    caller compares what it read (its "inputs") before handing its adapter back."""
    meta_path = out / META
    if not (meta_path.is_file() and (out / "adapter_model.safetensors").is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:  # cut short by a kill: the run did not complete
        return None
    return meta if meta.get("params") == json.loads(json.dumps(run_signature(config, method))) else None


def run_signature(config: Any, method: Method, read: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a resumed run must share with the one that wrote the checkpoint: the config, the method and
    (given) what it read."""
    resolved = {name: value for name, value in asdict(method).items() if name != "name"}  # config has it
    inputs = {"inputs": read} if read is not None else {}
    return json.loads(json.dumps({**config.signature(), "method_resolved": resolved, **inputs}))


def run_inputs(config: Any, setup: Setup) -> dict[str, Any]:
    """What the run read, by content: the same options on another forget split, model, cache or initial
    adapter at the same paths must train again, not hand back the adapter of the old ones."""
    initial = sorted(Path(config.init_adapter).glob("adapter_model.*")) if config.init_adapter else []
    return {
        "model": setup.loaded.model_fingerprint,
        "tokenizer": setup.loaded.tokenizer_fingerprint,
        "forget_samples": samples_fingerprint(setup.forget_samples),
        "retain_samples": samples_fingerprint(setup.retain_samples),
        "caches": {role: cache.manifest.fingerprint for role, cache in sorted(setup.opened.items())},
        "init_adapter": files_sha256(initial) if initial else None,
    }


def training_meta(
    config: Any,
    method: Method,
    setup: Setup,
    position: Position,
    processes: Processes,
    seconds: float,
) -> dict[str, Any]:
    """What the adapter was trained from and with: only this method's arguments."""

    def cache_record(cache: Cache | None) -> dict[str, str] | None:
        return cache and {"directory": cache.directory, "teacher": cache.teacher}

    return {
        "model": config.model,
        "model_fingerprint": setup.loaded.model_fingerprint,
        "tokenizer_fingerprint": setup.loaded.tokenizer_fingerprint,
        "model_parts": setup.loaded.model_parts,  # an adapter refused on another model names the file
        "method": method.name,
        "loss": method.loss,
        "arguments": {public_name(name): value for name, value in method.arguments.items()},
        "params": run_signature(config, method),
        "forget_cache": cache_record(setup.forget_cache),
        "retain_cache": cache_record(setup.retain_cache),
        "forget_samples": len(setup.forget_samples),
        "steps": position.global_step,
        "world_size": processes.world_size,
        "train_seconds": seconds,
        "final_loss": position.log[-1]["loss"] if position.log else None,
    }

"""Checkpoints (adapter + optimizer + scheduler + RNG + data position), written atomically."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.models.masked_delta import restore_masked_deltas, save_adapter
from pipeline.training.processes import Processes

CHECKPOINTS = "checkpoints"


@dataclass
class Position:
    """Where training stands: optimizer steps done, the epoch and step within it of the next step, the log."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)

    def advance(self, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> None:
        """Step `step_in_epoch` of `epoch` is done: the next one may start the next epoch."""
        self.global_step += 1
        self.epoch, self.step_in_epoch = epoch, step_in_epoch + 1
        if self.step_in_epoch == steps_per_epoch:
            self.epoch, self.step_in_epoch = epoch + 1, 0


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path,
    peft_model,
    optimizer,
    scheduler,
    position: Position,
    signature: dict[str, Any],
    processes: Processes,
    keep: int = 2,
) -> None:
    checkpoints = out / CHECKPOINTS
    final = checkpoints / f"step-{position.global_step:08d}"
    temporary = checkpoints / f".step-{position.global_step:08d}.tmp"
    if processes.main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    processes.barrier()
    torch.save(
        {"rng": rng_state()},
        temporary / f"rank-{processes.rank:03d}.pt",
    )
    if processes.main:
        save_adapter(peft_model, temporary / "adapter")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
            temporary / "optimizer.pt",
        )
        state = {
            "global_step": position.global_step,
            "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch,
            "world_size": processes.world_size,
            "signature": signature,
            "log": position.log,
        }
        (temporary / "state.json").write_text(json.dumps(state, indent=1))
    processes.barrier()
    if processes.main:
        os.replace(temporary, final)  # a checkpoint exists only once complete
        for old in sorted(checkpoints.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    processes.barrier()


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(
    checkpoint: Path, peft_model, optimizer, scheduler, signature: dict[str, Any], processes: Processes
) -> Position:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((checkpoint / "state.json").read_text())
    if state["signature"] != signature:
        differing = sorted(
            key
            for key in set(state["signature"]) | set(signature)
            if state["signature"].get(key) != signature.get(key)
        )
        raise ValueError(
            f"checkpoint {checkpoint} belongs to a run with other settings ({', '.join(differing)}): "
            f"use another --out or delete {checkpoint.parent}"
        )
    if state["world_size"] != processes.world_size:
        raise ValueError(
            f"checkpoint {checkpoint} was written by {state['world_size']} processes, this run has "
            f"{processes.world_size}: resume with the same --nproc-per-node"
        )
    weights = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(peft_model, weights)
    restore_masked_deltas(peft_model, checkpoint / "adapter")
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rank_state = torch.load(checkpoint / f"rank-{processes.rank:03d}.pt", weights_only=True)
    set_rng_state(rank_state["rng"])
    return Position(state["global_step"], state["epoch"], state["step_in_epoch"], state["log"])

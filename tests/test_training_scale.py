"""Training at real scale (issue 29): the process group a GPU run creates serves every tensor its
collectives meet, gradient checkpointing, and a forget set's epoch permuted sample by sample."""

from __future__ import annotations

import torch
import torch.distributed as dist

import pipeline.training.processes as processes_module
from pipeline.training.processes import Processes, start_processes
from pipeline.training.saliency import all_reduce_gradients, mean_over_ranks

# ---------------------------------------------------------------------------------------------------------
# The process group of a GPU run


def devices_served(backend: str) -> set[str]:
    """The device types a process group of `backend` reduces (torch's rule: nccl cuda, gloo cpu)."""
    default = {"nccl": {"cuda"}, "gloo": {"cpu"}}
    if ":" not in backend:
        return default[backend]
    return {part.split(":")[0] for part in backend.split(",")}


def recording_group(monkeypatch) -> dict:
    """torch.distributed replaced by a recorder of the backend it is started with and of each tensor it
    reduces; no process group is made."""
    recorded: dict = {"backend": None, "reduced": []}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **_: recorded.update(backend=backend))
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *_, **__: recorded["reduced"].append(tensor))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    return recorded


def test_a_gpu_runs_process_group_reduces_the_loss_totals_it_is_given(monkeypatch):
    """torchrun on GPUs: every tensor passed to all_reduce lies on a device the group's backend serves
    (an NCCL-only group ended the first optimizer step: "No backend type associated with device type cpu")."""
    recorded = recording_group(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    processes, target = start_processes("cuda")
    assert target == torch.device("cuda", 1) and processes.world_size == 2
    assert "cuda" in devices_served(recorded["backend"])
    processes.sum_over_ranks({"loss": 1.0, "kl": 2.0})
    assert recorded["reduced"], "the loss totals were not reduced"
    for tensor in recorded["reduced"]:
        assert tensor.device.type in devices_served(recorded["backend"]), (tensor.device, recorded["backend"])


def test_a_cpu_runs_process_group_is_gloo(monkeypatch):
    recorded = recording_group(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    start_processes("cpu")
    assert recorded["backend"] == "gloo" == processes_module.process_group_backend(torch.device("cpu"))


def test_gradients_and_saliency_sums_are_reduced_where_they_live(monkeypatch):
    """The gradients and MMUnlearner's sums stay on the parameters' device (meta stands in for cuda here)."""
    recorded = recording_group(monkeypatch)
    parameter = torch.nn.Parameter(torch.zeros(3, 2, device="meta"))
    all_reduce_gradients([parameter], world_size=2)
    mean_over_ranks([torch.zeros(3, device="meta")], 4, Processes(0, 2))
    assert [tensor.device.type for tensor in recorded["reduced"]] == ["meta", "meta"]

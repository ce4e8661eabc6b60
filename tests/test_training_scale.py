"""Training at real scale (issue 29): the process group a GPU run creates serves every tensor its
collectives meet, gradient checkpointing, and a forget set's epoch permuted sample by sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import pipeline.training.processes as processes_module
import pipeline.training.streams as streams
from cache import CachedSample, ShardWriter, read_manifest, truncate_top_p
from pipeline.experiments import experiment_names, experiment_values
from pipeline.samples import QASample
from pipeline.training.lora import add_lora
from pipeline.training.processes import Processes, start_processes
from pipeline.training.saliency import all_reduce_gradients, mean_over_ranks
from pipeline.training.streams import Cache, sample_stream
from stages import relearn, train
from stages.config import RelearnConfig, TrainConfig

REPO = Path(__file__).resolve().parent.parent

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


# ---------------------------------------------------------------------------------------------------------
# Gradient checkpointing

DATA = Path(__file__).parent / "fixtures" / "mllmu_train"  # forget_5: 3 samples


def counted(forward, forwards: list[int]):
    def counting(*args, **kwargs):
        forwards[-1] += 1
        return forward(*args, **kwargs)

    return counting


def test_gradient_checkpointing_recomputes_every_decoder_layer_and_trains_the_same_adapter(
    tiny_model_dir, tmp_path, monkeypatch
):
    """On: each decoder layer's MLP runs twice per training forward (the forward, and its recomputation in the
    backward pass); the adapter is the one trained without it (LoRA dropout on: the recomputation draws
    the same masks)."""
    forwards: list[int] = []

    def counting_add_lora(loaded, *args):
        forwards.append(0)
        for layer in [m for m in loaded.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]:
            # Inside the layer (transformers checkpoints the layer's forward) and not a hook (the recomputation
            # runs none).
            layer.mlp.forward = counted(layer.mlp.forward, forwards)
        return add_lora(loaded, *args)

    monkeypatch.setattr(train, "add_lora", counting_add_lora)
    outs = {}
    for checkpointing in (False, True):
        outs[checkpointing] = tmp_path / f"checkpointing-{checkpointing}"
        train.run(
            TrainConfig(
                model=str(tiny_model_dir), data=str(DATA), out=str(outs[checkpointing]), method="ga",
                forget_split="forget_5", lr=5e-3, batch_size=2, epochs=2, lora_dropout=0.1, seed=0,
                gradient_checkpointing=checkpointing,
            )
        )  # fmt: skip
    assert forwards[0] > 0 and forwards[1] == 2 * forwards[0]
    plain, checkpointed = (load_file(str(outs[key] / "adapter_model.safetensors")) for key in (False, True))
    assert sum(float(value.abs().sum()) for key, value in plain.items() if "lora_B" in key) > 0
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key])
    logs = [json.loads((outs[key] / "train_log.json").read_text()) for key in (False, True)]
    assert [row["loss"] for row in logs[1]] == pytest.approx([row["loss"] for row in logs[0]])


def test_the_real_experiments_train_and_relearn_with_gradient_checkpointing_and_the_mini_world_without():
    for name in experiment_names(REPO):
        values = experiment_values(REPO, name)
        expected = name != "mini"
        assert values["train"].get("gradient_checkpointing", False) is expected, name
        assert values["relearn"].get("gradient_checkpointing", False) is expected, name
        if values.get("finetunes"):  # an experiment fine-tuning its own full model does so checkpointed too
            assert values["finetune"].get("gradient_checkpointing", False) is True, name


def test_relearn_trains_with_the_gradient_checkpointing_it_is_given():
    config = RelearnConfig(
        model="unused", data=str(DATA), out="unused", forget_split="retain_95", gradient_checkpointing=True
    )
    assert relearn.train_config(config).gradient_checkpointing is True


# ---------------------------------------------------------------------------------------------------------
# One epoch's order


def block_cache(directory: Path, samples: int = 512, block: int = 128) -> Path:
    """A cache of `samples` one-token samples in row groups of `block` (the writer's default)."""
    header = {"teacher": "viker", "model_fingerprint": "m", "tokenizer_fingerprint": "t", "vocab_size": 10}
    with ShardWriter(directory, 0, 1, header, row_group_samples=block) as writer:
        for index in range(samples):
            logits = torch.linspace(0, 1, 10, dtype=torch.float64)[None] * (index % 7)
            cached = CachedSample.from_distributions(
                f"s/{index}", torch.tensor([index % 10]), truncate_top_p(logits, 0.9, 4), torch.zeros(1)
            )
            writer.write(cached, {})
    return directory


def epoch_order(directory: Path, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    cache = Cache(str(directory), read_manifest(directory), "viker")
    samples = [QASample(f"s/{index}", "p", "q", "a", None) for index in range(512)]
    stream = sample_stream(samples, cache, seed, "forget", epoch, Processes(rank, world_size))
    return [int(sample.sample_id.split("/")[1]) for sample, _ in stream]


def same_block_pairs(order: list[int]) -> int:
    """How many consecutive samples come from the same 128-sample row group."""
    return sum(a // 128 == b // 128 for a, b in zip(order[:-1], order[1:], strict=True))


def test_one_epoch_of_a_forget_cache_is_a_permutation_of_single_samples_the_same_on_every_rank(tmp_path):
    """Consecutive samples share a 128-sample row group about as often as chance (1 in 4 here), not
    127 times in 128 as a shuffle of row groups gives; the ranks' parts interleave into one process's
    order, and a seed and epoch give one order (a resumed run skips into the same)."""
    directory = block_cache(tmp_path / "cache")
    order = epoch_order(directory, seed=3, epoch=0)
    assert sorted(order) == list(range(512))
    assert same_block_pairs(order) / (len(order) - 1) < 0.4
    parts = [epoch_order(directory, 3, 0, rank, 3) for rank in range(3)]
    assert [parts[p % 3][p // 3] for p in range(512)] == order
    assert epoch_order(directory, 3, 0) == order != epoch_order(directory, 3, 1)


def test_a_cache_over_the_limit_is_read_a_row_group_at_a_time(tmp_path, monkeypatch):
    directory = block_cache(tmp_path / "cache")
    monkeypatch.setattr(streams, "PERMUTE_WHOLE_BYTES", 0)
    order = epoch_order(directory, seed=3, epoch=0)
    assert sorted(order) == list(range(512))
    assert same_block_pairs(order) == 511 - 3  # all but the 3 changes of row group


def test_mmunlearners_masked_term_gives_the_same_adapter_under_gradient_checkpointing(
    tiny_model_dir, tmp_path
):
    """Its adapted layers' forwards are recorded for the masked gradient: not again when the backward pass
    recomputes a checkpointed layer."""
    weights = []
    for checkpointing in (False, True):
        out = tmp_path / f"checkpointing-{checkpointing}"
        train.run(
            TrainConfig(
                model=str(tiny_model_dir), data=str(DATA), out=str(out), method="mmunlearner",
                forget_split="forget_5", retain_split="retain_95", lr=5e-3, batch_size=2, epochs=1, seed=0,
                gradient_checkpointing=checkpointing,
            )
        )  # fmt: skip
        weights.append(load_file(str(out / "adapter_model.safetensors")))
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key])

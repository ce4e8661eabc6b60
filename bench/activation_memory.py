"""Activation memory of LoRA training per token per decoder layer, at LLaVA-1.5-7B's language model's size;
writes bench/results/activation_memory.json.

    python bench/activation_memory.py [--tokens 256] [--layers 2] [--threads 2]

A Llama-2-7B decoder (LLaVA-1.5-7B's language model: hidden 4096, intermediate 11008, 32 heads) with random
weights in bf16 and `--layers` layers, LoRA r 8 / alpha 16 on the attention's q, k, v, o projections as the
experiments put it there (PEFT, its adapter weights in float32 as get_peft_model makes them), one forward
and backward over one sequence of `--tokens` tokens (frozen embeddings: the input does not require a
gradient). Measured: the bytes of the tensors autograd keeps for the backward pass, each storage counted once
and weights excluded (torch.autograd.graph.saved_tensors_hooks), attributed to the decoder layer that saves
them, per token. With gradient checkpointing on (pipeline.training.lora.enable_gradient_checkpointing, as
`--gradient-checkpointing` does it) a layer keeps only the inputs of its checkpointed call (its hidden states,
the attention mask and the rotary tables); autograd's hooks inside the checkpoint are the checkpoint's own,
so those inputs are counted where the checkpoint receives them. Four settings: checkpointing off / on, times
lora_dropout 0 / the experiments' 0.05.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.training.lora import enable_gradient_checkpointing  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "activation_memory.json"
LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
LORA_TARGETS = r".*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"  # the family's, without the prefix
EXPERIMENTS_DROPOUT = 0.05  # TrainConfig's default, which the real experiments keep


def decoder(layers: int, dropout: float, checkpointing: bool):
    """A random bf16 Llama decoder of LLaVA-1.5-7B's layer size with the experiments' LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(**LLAMA_2_7B, num_hidden_layers=layers, vocab_size=256, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaModel._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.requires_grad_(False)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    peft_model = get_peft_model(model, lora)
    if checkpointing:
        enable_gradient_checkpointing(model)
    peft_model.train()
    return peft_model, model


class SavedBytes:
    """Bytes of the tensors autograd saves, each storage once, weights excluded, per decoder layer (None:
    outside every layer)."""

    def __init__(self, model, layers: list) -> None:
        self.weights = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
        self.seen: set[int] = set()
        self.by_layer: dict[int | None, int] = {}
        self.current: int | None = None
        for index, layer in enumerate(layers):
            layer.register_forward_pre_hook(functools.partial(self.enter, index))
            layer.register_forward_hook(self.leave)
            if getattr(layer, "gradient_checkpointing", False):
                layer._gradient_checkpointing_func = self.counting_inputs(layer._gradient_checkpointing_func)

    def enter(self, index: int, *_) -> None:
        self.current = index

    def leave(self, *_) -> None:
        self.current = None

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.weights or key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        self.by_layer[self.current] = self.by_layer.get(self.current, 0) + storage.nbytes()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor)
        return tensor

    def counting_inputs(self, checkpoint):
        """What a checkpointed layer keeps: the inputs its recomputation runs on."""

        def kept(function, *args, **kwargs):
            keywords = getattr(function, "keywords", {})
            for value in [*args, *kwargs.values(), *keywords.values()]:
                for tensor in value if isinstance(value, tuple) else (value,):
                    if isinstance(tensor, torch.Tensor):
                        self.add(tensor)
            return checkpoint(function, *args, **kwargs)

        return kept


def measure(tokens: int, layers: int, dropout: float, checkpointing: bool) -> dict:
    peft_model, model = decoder(layers, dropout, checkpointing)
    saved = SavedBytes(model, list(model.layers))
    embeddings = torch.randn(1, tokens, LLAMA_2_7B["hidden_size"], dtype=torch.bfloat16)
    started = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
        hidden = peft_model(inputs_embeds=embeddings, use_cache=False).last_hidden_state
        loss = hidden.float().pow(2).mean()
    forward_s = time.perf_counter() - started
    loss.backward()
    # lora_B starts at zero, so lora_A's first gradient is zero: lora_B's shows the backward reached all.
    lora_b = [p.grad for name, p in peft_model.named_parameters() if "lora_B" in name]
    per_layer = [saved.by_layer.get(index, 0) / tokens / 1024 for index in range(layers)]
    return {
        "lora_dropout": dropout,
        "gradient_checkpointing": checkpointing,
        "kib_per_token_per_layer": per_layer,
        "kib_per_token_outside_layers": saved.by_layer.get(None, 0) / tokens / 1024,
        "every_lora_b_got_a_gradient": all(g is not None and bool(g.abs().sum() > 0) for g in lora_b),
        "forward_s": forward_s,
        "forward_backward_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    runs = [
        measure(options.tokens, options.layers, dropout, checkpointing)
        for checkpointing in (False, True)
        for dropout in (0.0, EXPERIMENTS_DROPOUT)
    ]
    for run in runs:
        print(json.dumps(run), flush=True)
    import peft
    import transformers

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus (shared)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "layer": {**LLAMA_2_7B, "dtype": "bfloat16", "lora": {"r": 8, "alpha": 16, "targets": LORA_TARGETS}},
        "tokens": options.tokens,
        "layers": options.layers,
        "runs": runs,
    }
    Path(options.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

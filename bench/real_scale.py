"""Benchmark at real scale: a randomly initialised model with LLaVA-1.5-7B's exact architecture.

    # on one GPU (writes bench/results/real_scale.json with the device name):
    python bench/real_scale.py --device cuda
    # anywhere, in about a minute: a scaled-down config proving the script runs (no file unless --out):
    python bench/real_scale.py --device cpu --tiny

Nothing is downloaded: the config below is llava-hf/llava-1.5-7b-hf's written out by hand (CLIP
ViT-L/14-336 vision tower, Vicuna-7B language model, 32064-row vocabulary, <image> = 32000, a GELU
projector), the weights are random, and the tokenizer is a byte-level BPE trained on the mini world's
text, laid out like LLaVA's (<unk> <s> </s> at 0-2, <image> 32000, <pad> 32001). Random weights
change no shape, so time and memory are those of the real model; the text and images are the mini
world's (`--data` takes an MLLMU-Bench-layout directory instead).

Measured:
  precompute_samples_per_s   forget samples per second through stage one's loop at k=5 (ViKeR): the
                             teacher builds k reference-image variants per sample, stages.precompute's
                             TeacherExtractor runs them as one batch (inference mode, answer-only output
                             layer, mean of k softmaxes, top-p truncation on the device), rows are
                             written to a zstd Parquet shard.                         (goal >= 10 on H100)
  train[b]                   LoRA (rank 8 on the language model's attention, the family's regex) on
                             bf16 weights, AdamW, the ViKeR loss against the rows just cached, batch b:
                             samples/s and peak GPU memory.                  (goal: 7B within 40 GiB)
  mc_scoring                 seconds per multiple-choice question, one question at a time as eval.py
                             asks them: by likelihood (MLLMU-Bench Eq. 13: the four options teacher-
                             forced after the question in one forward, pipeline.models.answer_token_log_probs
                             as `pipeline evaluate --mc-scoring likelihood` runs it) and by generating
                             a reply of L tokens (greedy, pipeline.models.generate at batch 1), for each
                             L of --mc-reply-tokens. Random weights almost never emit the end token, so
                             a reply runs its L tokens: the rows say what a model whose replies end after
                             L tokens pays, and where likelihood becomes the cheaper scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cache import ShardWriter, concat_samples  # noqa: E402
from pipeline.mini_world.config import WorldConfig  # noqa: E402
from pipeline.mini_world.tiny_model import llava_tokenizer  # noqa: E402
from pipeline.mini_world.world import build_world  # noqa: E402
from pipeline.models import (  # noqa: E402
    DTYPES,
    LlavaFamily,
    LoadedModel,
    TeacherForcingBatch,
    answer_logits,
    answer_token_log_probs,
    encode_answers,
    generate,
    prompted,  # noqa: E402
    tokenizer_fingerprint,
)
from pipeline.samples import QASample  # noqa: E402
from pipeline.unlearning.extractor import TeacherExtractor  # noqa: E402
from pipeline.unlearning.losses import AnswerPredictions, compute_loss  # noqa: E402
from pipeline.unlearning.teachers import TEACHERS, TeacherContext  # noqa: E402

# llava-hf/llava-1.5-7b-hf/config.json, with the defaults it relies on written out.
LLAVA_15_7B = {
    "model_type": "llava",
    "image_token_index": 32000,
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False,
    "text_config": {  # lmsys/vicuna-7b-v1.5 (Llama-2-7B)
        "model_type": "llama",
        "vocab_size": 32064,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    },
    "vision_config": {  # openai/clip-vit-large-patch14-336
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
    },
}

# --tiny: the same structure and token ids, shrunk to run on a CPU in seconds.
TINY_OVERRIDES = {
    "text_config": {
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": 112,
    },
}


def model_config(tiny: bool) -> dict:
    config = json.loads(json.dumps(LLAVA_15_7B))
    if tiny:
        for part, overrides in TINY_OVERRIDES.items():
            config[part].update(overrides)
    return config


def llava_layout_tokenizer(corpus: list[str], vocab_size: int = 4000):
    """A byte-level BPE trained on corpus, with LLaVA-1.5's special token ids (filler rows up to 32000)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = byte_level
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(corpus, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), 32000)})  # never produced by the merges
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]], unk_token="<unk>")
    )
    tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<image>", "<pad>"])  # 32000, 32001 as in llava-hf
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = llava_tokenizer(tokenizer)
    assert wrapped.convert_tokens_to_ids("<image>") == 32000 and wrapped.pad_token_id == 32001
    return wrapped


def build_model(
    config_dict: dict, tokenizer, dtype: str, device: str, attn_implementation: str
) -> LoadedModel:
    """The random model, initialised directly on the device in its dtype (no 28 GB fp32 copy on the host)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    config = LlavaConfig(**config_dict)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(
            config, dtype=DTYPES[dtype], attn_implementation=attn_implementation
        )
    model.eval().requires_grad_(False)
    image_size = config.vision_config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LoadedModel(
        model=model,
        processor=processor,
        family=LlavaFamily(config),
        model_fingerprint="random-init",
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        path="random:llava-1.5-7b" + ("-tiny" if config.text_config.num_hidden_layers < 32 else ""),
    )


def mini_world_data(num_samples: int) -> tuple[list[QASample], list[tuple[str, bytes]], list[str]]:
    """Forget-style image questions, the people reference pool and the text corpus of the mini world."""

    world = build_world(WorldConfig(num_people=max(20, num_samples // 5 + 1), num_reference_people=40))
    samples = world.samples(kinds=("qa",), groups=("fictitious",))
    return (
        [s for s in samples if s.image is not None][:num_samples],
        world.references["people"],
        world.text_corpus(),
    )


def real_data(data_dir: str, references: str | None, split: str, num_samples: int):
    from pipeline.benchmarks import load_reference_pool, reference_root
    from pipeline.benchmarks.mllmu import load_unlearning_samples

    samples = [s for s in load_unlearning_samples(data_dir, split, ("qa",)) if s.image is not None]
    pool = load_reference_pool(reference_root(references, data_dir, "people"), "people")
    corpus = [text for s in samples for text in (s.question, s.answer)]
    return samples[:num_samples], pool, corpus


class Clock:
    """Wall time with the device's queue drained at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    return {"process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def autocast(device: torch.device, enabled: bool):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if enabled and device.type == "cuda" else nullcontext()
    )


def pinned(batch: TeacherForcingBatch, device: torch.device) -> TeacherForcingBatch:
    """Page-locked host tensors, so that .to(device, non_blocking=True) really overlaps."""
    if device.type != "cuda":
        return batch
    batch.inputs = {name: value.pin_memory() for name, value in batch.inputs.items()}
    batch.predict_positions, batch.targets = batch.predict_positions.pin_memory(), batch.targets.pin_memory()
    return batch


def measure_precompute(loaded, samples, pool, args, device, work: Path) -> tuple[dict, dict]:
    """Stage one's loop (teacher -> TeacherExtractor -> shard writer) over batches of forget samples."""
    context = TeacherContext(
        family=loaded.family,
        arguments={"k": args.k, "reference_kind": "people", "seed": 0},
        reference_pool=pool,
        reference_kind="people",
    )
    teacher = TEACHERS["viker"]
    extractor = TeacherExtractor(loaded, top_p=0.99, max_support=64)
    vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])
    batches = [
        samples[i : i + args.precompute_batch_size]
        for i in range(0, len(samples), args.precompute_batch_size)
    ]
    rows, sequence_tokens, answer_tokens = {}, [], []
    clock = Clock(device)
    timed_samples, timed_seconds = 0, 0.0
    reset_peak(device)
    with ShardWriter(work / "cache", 0, 1, {"teacher": "viker", "vocab_size": vocab_size}) as writer:
        for index, chunk in enumerate(batches):
            started = clock.now()
            inputs = [teacher(sample, context) for sample in chunk]
            with autocast(device, args.autocast):
                computed = extractor(chunk, inputs)
            for sample, teacher_input, row in zip(chunk, inputs, computed, strict=True):
                writer.write(row, {**teacher_input.record(), "answer": sample.answer})
                rows[sample.sample_id] = row
            elapsed = clock.now() - started
            if index >= args.warmup:  # the first batches pay for kernels, allocator and feature-cache fills
                timed_samples += len(chunk)
                timed_seconds += elapsed
            if index == 0:
                variants = [v for teacher_input in inputs for v in teacher_input.variants]
                batch = encode_answers(loaded, variants)
                sequence_tokens = batch.inputs["attention_mask"].sum(dim=1).tolist()
                answer_tokens = batch.answer_lengths
    result = {
        "samples_per_s": timed_samples / timed_seconds if timed_seconds else float("nan"),
        "timed_samples": timed_samples,
        "timed_seconds": timed_seconds,
        "k": args.k,
        "batch_size_samples": args.precompute_batch_size,
        "sequences_per_forward": args.precompute_batch_size * args.k,
        "mean_sequence_tokens": sum(sequence_tokens) / len(sequence_tokens),
        "mean_answer_tokens": sum(answer_tokens) / len(answer_tokens),
        "reference_pool_images": len(pool),
        "vision_features_encoded": extractor.vision_features.encoded,
        "vision_features_reused": extractor.vision_features.reused,
        **peak_memory_gib(device),
    }
    return result, rows


def measure_training(loaded, samples, rows, batch_size: int, args, device) -> dict:
    """LoRA steps of the ViKeR loss against the cached rows, as stages.train's LossStep runs them."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        loaded.model,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=loaded.family.lora_target_modules,
            bias="none",
        ),
    )
    peft_model.train()
    trainable = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=5e-6)
    clock = Clock(device)
    reset_peak(device)
    timed_seconds, steps = 0.0, args.warmup + args.train_steps
    try:
        for step in range(steps):
            start = (step * batch_size) % max(1, len(samples) - batch_size + 1)
            chunk = samples[start : start + batch_size]
            started = clock.now()
            batch = pinned(encode_answers(loaded, [prompted(loaded, sample) for sample in chunk]), device)
            batch = batch.to(device)
            teacher = concat_samples([rows[sample.sample_id] for sample in chunk])[1].to(device)
            with autocast(device, args.autocast):
                logits = answer_logits(peft_model, batch)
            predictions = AnswerPredictions(logits, batch.targets, batch.answer_lengths)
            loss = compute_loss("viker", {"forget": predictions, "forget_teacher": teacher}, {})["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = clock.now() - started
            if step >= args.warmup:
                timed_seconds += elapsed
        result = {
            "samples_per_s": args.train_steps * batch_size / timed_seconds,
            "step_s": timed_seconds / args.train_steps,
            "trainable_parameters": sum(p.numel() for p in trainable),
            "last_loss": float(loss.detach()),
            **peak_memory_gib(device),
        }
    except torch.OutOfMemoryError as error:
        result = {"out_of_memory": str(error).splitlines()[0], **peak_memory_gib(device)}
    finally:
        optimizer.zero_grad(set_to_none=True)
        peft_model.unload()  # the plain model again, for the next batch size
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def measure_mc_scoring(loaded, samples, args, device) -> dict:
    """Seconds per question of likelihood scoring and of generating replies of each length; a
    question's options are its own answer and the next three samples' (the text does not change the cost)."""
    questions = samples[: args.warmup + args.mc_questions]
    timed = len(questions) - args.warmup
    if timed < 1:
        raise SystemExit(
            f"--mc-questions: {len(samples)} samples leave none to time after {args.warmup} warm-up"
        )
    loaded.model.eval()
    options = [[samples[(i + j) % len(samples)].answer for j in range(4)] for i in range(len(questions))]
    clock = Clock(device)

    def per_question(score_one) -> float:
        for index in range(args.warmup):
            score_one(index)
        started = clock.now()
        for index in range(args.warmup, len(questions)):
            score_one(index)
        return (clock.now() - started) / timed

    def by_likelihood(index: int) -> None:
        inputs = [prompted(loaded, questions[index], answer=option) for option in options[index]]
        answer_token_log_probs(loaded, loaded.model, inputs, batch_size=len(inputs))

    def by_generation(reply_tokens: int):
        def one(index: int) -> None:
            generate(loaded, [prompted(loaded, questions[index])], max_new_tokens=reply_tokens, batch_size=1)

        return one

    with torch.inference_mode(), autocast(device, args.autocast):
        likelihood = per_question(by_likelihood)
        generation = {str(n): per_question(by_generation(n)) for n in args.mc_reply_tokens}
    return {
        "questions": timed,
        "likelihood_s_per_question": likelihood,
        "generate_s_per_question": generation,
        "generate_over_likelihood": {n: seconds / likelihood for n, seconds in generation.items()},
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="A scaled-down config (CPU smoke run).")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument(
        "--autocast", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA."
    )
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument(
        "--precompute-batch-size",
        type=int,
        default=None,
        help="Forget samples per forward (x k) [8; tiny 4].",
    )
    parser.add_argument("--train-batch-sizes", default="2,3,4")
    parser.add_argument(
        "--train-steps", type=int, default=None, help="Timed optimizer steps per batch size [10; tiny 2]."
    )
    parser.add_argument("--warmup", type=int, default=None, help="Untimed batches / steps first [2; tiny 1].")
    parser.add_argument(
        "--samples", type=int, default=None, help="Forget samples to precompute [200; tiny 12]."
    )
    parser.add_argument(
        "--data", default=None, help="MLLMU-Bench-layout data directory [default: the mini world]."
    )
    parser.add_argument(
        "--references",
        default=None,
        help="Folder holding references/people/ [default: beside --data, as precompute looks].",
    )
    parser.add_argument("--split", default="forget_10")
    parser.add_argument(
        "--mc-questions", type=int, default=None, help="Timed multiple-choice questions [20; tiny 3]."
    )
    parser.add_argument(
        "--mc-reply-tokens",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[1, 2, 8, 50],
        help="Generated reply lengths to time (eval.py allows 50) [1,2,8,50].",
    )
    parser.add_argument(
        "--model", default=None, help="A real checkpoint (directory or hub id) instead of the random 7B."
    )
    parser.add_argument(
        "--out", default=None, help="Results JSON [default: bench/results/real_scale.json, none with --tiny]."
    )
    args = parser.parse_args(argv)
    for name, full, tiny in (
        ("precompute_batch_size", 8, 4),
        ("train_steps", 10, 2),
        ("warmup", 2, 1),
        ("samples", 200, 12),
        ("mc_questions", 20, 3),
    ):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    device = torch.device(args.device)

    started = time.perf_counter()
    if args.data:
        samples, pool, corpus = real_data(args.data, args.references, args.split, args.samples)
    else:
        samples, pool, corpus = mini_world_data(args.samples)
    if args.model:
        from pipeline.models import load_model

        loaded = load_model(args.model, args.dtype, args.device, args.attn_implementation)
    else:
        tokenizer = llava_layout_tokenizer(corpus)
        config = model_config(args.tiny)
        loaded = build_model(config, tokenizer, args.dtype, args.device, args.attn_implementation)
    parameters = sum(p.numel() for p in loaded.model.parameters())
    results: dict = {
        "device": device_name(device),
        "torch": torch.__version__,
        "config": args.model
        or (
            "tiny (scaled-down LLaVA-1.5 structure)"
            if args.tiny
            else "llava-hf/llava-1.5-7b-hf (random weights)"
        ),
        "parameters": parameters,
        "dtype": args.dtype,
        "autocast": args.autocast and device.type == "cuda",
        "attn_implementation": args.attn_implementation,
        "data": args.data or "mini world (in memory)",
        "setup_s": time.perf_counter() - started,
    }
    with tempfile.TemporaryDirectory(prefix="bench-real-scale-") as work:
        results["precompute"], rows = measure_precompute(loaded, samples, pool, args, device, Path(work))
    results["train"] = {}
    for batch_size in [int(b) for b in args.train_batch_sizes.split(",")]:
        results["train"][str(batch_size)] = measure_training(loaded, samples, rows, batch_size, args, device)
    results["mc_scoring"] = measure_mc_scoring(loaded, samples, args, device)
    if not args.tiny:
        results["goals"] = {
            "precompute_forget_samples_per_s_at_k5 >= 10": results["precompute"]["samples_per_s"] >= 10,
            "lora_training_peak_gib <= 40": all(
                r.get("peak_allocated_gib", float("inf")) <= 40 for r in results["train"].values()
            ),
        }
    out = args.out or (None if args.tiny else str(ROOT / "bench/results/real_scale.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

"""The schema of every stage: one config dataclass per command, one field per parameter.

The CLI options are generated from these fields (pipeline.config), params.yaml holds their values (one
section per command), and a stage function takes its config. The defaults are the papers' settings where
they state one (ViKeR App. A.4, MLLMU-Bench's eval.py); the embedded mini world's values are in
params.yaml. This module imports nothing heavy, so `pipeline --help` and parameter errors are instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.benchmarks import LAYOUT_NAMES, Layout, layout
from pipeline.config import param
from pipeline.mini_world.config import FineTuneConfig, WorldConfig

DTYPES = ("fp32", "bf16", "fp16")
DATA_FORMATS = ("auto", *LAYOUT_NAMES)  # auto: the first layout that detects itself in the folder
KEY_TOKEN_EPSILON = 0.5  # nats; ViKeR Def. 2 leaves epsilon to the user


@dataclass(kw_only=True)
class ModelOptions:
    """How a stage loads a model (every stage that runs one)."""

    model: str = param(help="Model directory or hub id (the frozen full model).")
    dtype: str = param("fp32", "Compute dtype.", choices=DTYPES)
    device: str = param("cpu", "torch device, e.g. cpu, cuda, cuda:1.")
    attn_implementation: str | None = param(
        None, "Attention kernel: sdpa | eager | flash_attention_2 (none: transformers' choice)."
    )
    trust_remote_code: bool = param(False, "Run model code shipped with a hub checkpoint (off unless asked).")
    # Every loss then counts the closing token as one more answer token; MLLMU-Bench fine-tuned its LLaVA
    # without one, so its experiments turn this off for the vanilla checkpoint.
    close_answers: bool = param(True, "Teacher-force each answer's closing token (end of turn or EOS).")
    prompt_template: str | None = param(
        None,
        "The family's prompt format: llava | mllmu-bench (LLaVA), chat (Qwen); none: the family's first.",
    )
    processor_from: str | None = param(
        None,
        "Folder or hub id whose tokenizer and processor go with --model's weights, for a checkpoint saved "
        "without them (MLLMU-Bench's fine-tuned LLaVA: llava-hf/llava-1.5-7b-hf's); none: --model's own.",
    )
    # Qwen's checkpoints allow 12,845,056 px (16,384 image tokens): one 3000 x 2000 photo is 7,597 tokens
    # and pads its whole batch. transformers' own Qwen2VLImageProcessor default, and the Qwen2.5-VL card's
    # suggestion, is 1280 x 28 x 28 = 1,003,520 px (1,280 tokens); the Qwen experiments set it.
    max_pixels: int | None = param(
        None,
        "Largest image area in pixels after resizing (Qwen2-VL / Qwen2.5-VL; 784 px a token); none: the "
        "checkpoint's preprocessor_config.",
        low=1,
    )

    def loading(self) -> dict[str, Any]:
        """pipeline.models.load_model's keyword arguments."""
        return {
            "dtype": self.dtype,
            "device": self.device,
            "attn_implementation": self.attn_implementation,
            "trust_remote_code": self.trust_remote_code,
            "close_answers": self.close_answers,
            "prompt_template": self.prompt_template,
            "processor_from": self.processor_from,
            "max_pixels": self.max_pixels,
        }


@dataclass(kw_only=True)
class DataOptions:
    """Where a stage reads its data (every stage that reads a split); pipeline.benchmarks reads it."""

    data: str = param(help="Data directory: MLLMU-Bench's hub layout, CLEAR's, or local split files.")
    data_format: str = param(
        "auto",
        "Layout of --data (pipeline.benchmarks); auto: detected from the folder.",
        choices=DATA_FORMATS,
    )

    train_data: str | None = param(
        None,
        "Folder of the unlearning triples in the same layout (MLLMU-Bench's training rows with their "
        "`metadata` QA, hub MLLMMU/baseline_train_split); none: --data.",
    )
    forget_split: str = param("forget_10", "Forget split: its test, retain and real splits go with it.")
    retain_split: str | None = param(None, "Retain split (none: the forget split's, e.g. retain_90).")

    def layout(self) -> Layout:
        """The evaluation data's layout."""
        return layout(self.data_format, self.data)

    def training_layout(self) -> Layout:
        """Where precompute, training and membership inference read their triples."""
        return layout(self.data_format, self.train_data or self.data)

    def split_names(self, data=None) -> dict[str, str]:
        """Role -> split name of this experiment (forget, retain, and the layout's evaluation roles), from
        `data` (this config's layout(), built when not given)."""
        names = (data or self.layout()).split_names(self.forget_split)
        return {**names, "retain": self.retain_split or names["retain"]}


@dataclass(kw_only=True)
class PrepareConfig:
    """prepare-mini: the embedded mini world and the tiny full model that has memorized it."""

    out: str = param("work/mini", "Where the world (data/, references/) and the full model (model/) go.")
    metrics_out: str = param(
        "metrics/full_model.json", "Memorization figures of the full model; '' skips the measurement."
    )
    people_per_split: int = param(20, "People of each split the memorization measurement asks about.", low=1)
    world: WorldConfig = param(default_factory=WorldConfig)
    fine_tune: FineTuneConfig = param(default_factory=FineTuneConfig)


@dataclass(kw_only=True)
class CacheOptions:
    """Where the teacher caches are: precompute writes <cache_root>/<teacher entry>, train reads there."""

    cache_root: str = param(
        "work/cache", "Folder of the teacher caches, one per entry of params.yaml `teachers`."
    )


@dataclass(kw_only=True)
class PrecomputeConfig(ModelOptions, DataOptions, CacheOptions):
    """precompute: the frozen model's top-p truncated teacher distributions over the answer tokens.

    The options here are what every teacher shares; a teacher's own arguments (ViKeR's k, Vgid's sigma)
    are declared by its function (pipeline.unlearning.teachers) and set by its params.yaml `teachers` entry.
    """

    out: str | None = param(
        None, "Cache directory (shard-XXXXX-of-NNNNN.parquet/.json); none: <cache_root>/<teacher>."
    )
    teacher: str = param(
        "viker",
        "A params.yaml `teachers` entry, or a teacher (pipeline.unlearning.teachers) with its defaults: "
        "viker | vgid | icu | noise | original | base.",
    )
    args: dict[str, Any] = param(
        default_factory=dict, help="The teacher's arguments, KEY=VALUE, over the entry's (e.g. sigma=0.2)."
    )
    references: str | None = param(None, "Folder holding references/<kind>/ (none: beside --data).")
    top_p: float = param(
        0.9, "Keep at least the smallest support of this mass per token.", low=0, high=1, low_open=True
    )
    tail_cost: float = param(
        4e-5,
        "Nats an extra support entry must save: each token also keeps the entries (ranked by teacher + "
        "student probability) that bring the tail bucket's KL error against the student at step 0 down "
        "by at least this much each; 0: top-p alone (docs/performance.md).",
        low=0,
    )
    max_support: int = param(1024, "At most this many tokens per support.", low=1)
    split: str | None = param(
        None, "Split to cache (none: the teacher's, --forget-split or the retain split)."
    )
    kinds: tuple[str, ...] = param(("qa",), "Comma list of sample kinds: qa, generation, mc, cloze.")
    shard_index: int | None = param(None, "Compute only this shard (none: every shard).", low=0)
    num_shards: int = param(1, "Shards of the cache.", low=1)
    batch_size: int = param(8, "Samples per forward pass (times k for ViKeR).", low=1)
    threads: int = param(0, "torch threads (0: torch's default), e.g. 1 per shard process.", low=0)
    limit: int | None = param(None, "Only the first N samples of the split.", low=1)
    progress: bool = param(True, "Show a progress bar.")


@dataclass(kw_only=True)
class TrainConfig(ModelOptions, DataOptions, CacheOptions):
    """train: LoRA unlearning with a method's loss, streaming the teacher cache."""

    out: str = param(help="Adapter directory (PEFT) with training_meta.json and the step log.")
    method: str = param(
        "viker", "A method of params.yaml's `methods` (its loss, caches, args) or a loss name."
    )
    loss: str | None = param(None, "The loss (pipeline.unlearning.losses); none: the method's.")
    args: dict[str, Any] = param(
        default_factory=dict, help="The loss's arguments, KEY=VALUE, over the method's (e.g. lambda=0.5)."
    )
    forget_cache: str | None = param(
        None, "Teacher cache of the forget split (none: <cache_root>/<the method's forget_teacher>)."
    )
    retain_cache: str | None = param(
        None, "Frozen-model cache of the retain split (none: <cache_root>/<the method's retain_teacher>)."
    )
    teacher_source: str = param(
        "cache",
        "Where the teacher rows come from: the cache | online: the cache's teacher, its full distribution "
        "recomputed every step from the same inputs (the cache-fidelity benchmark, docs/performance.md).",
        choices=("cache", "online"),
    )
    refusals: str | None = param(
        None, "Refusal sentences for IdkPO, one per line (none: pipeline/unlearning/refusals.txt)."
    )
    forget_people: tuple[str, ...] = param(
        (), "Comma list of person IDs: train on only their forget samples (none: the whole split)."
    )
    sample_kinds: tuple[str, ...] = param(("qa",), "Comma list of sample kinds: qa, generation, mc, cloze.")
    # Optimisation: ViKeR App. A.4 (LoRA r 8 / alpha 16, AdamW, lr 5e-6, batch 2, 1 epoch).
    lr: float = param(5e-6, "AdamW learning rate.", low=0, low_open=True)
    batch_size: int = param(2, "Global forget samples per micro-batch.", low=1)
    epochs: int = param(1, "Passes over the forget split.", low=1)
    grad_accum: int = param(1, "Micro-batches per optimizer step.", low=1)
    max_steps: int | None = param(None, "Stop after this many optimizer steps.", low=1)
    weight_decay: float = param(0.0, "AdamW weight decay.", low=0)
    lr_scheduler: str = param("constant", "Learning-rate schedule.", choices=("constant", "linear"))
    max_grad_norm: float | None = param(
        None, "Clip gradients to this norm (none: no clipping).", low=0, low_open=True
    )
    lora_rank: int = param(8, "LoRA rank r.", low=1)
    lora_alpha: int = param(16, "LoRA alpha.", low=1)
    lora_dropout: float = param(0.05, "LoRA dropout.", low=0, high=1)
    lora_targets: str = param(
        "attention",
        "What LoRA adapts in the language model: its attention projections, or every linear layer.",
        choices=("attention", "linear"),
    )
    also_train_on: tuple[str, ...] = param(
        (),
        "Comma list of further splits trained on as the forget split is (the finetune stage's retain split).",
    )
    gradient_checkpointing: bool = param(
        False, "Recompute each decoder layer's activations in the backward pass instead of keeping them."
    )
    init_adapter: str | None = param(
        None, "Train on from this LoRA adapter (its weights, rank and alpha); none: fresh LoRA weights."
    )
    seed: int = param(0, "Seeds LoRA's initialisation, dropout and the data order.")
    checkpoint_every: int = param(0, "Optimizer steps between checkpoints; 0: never.", low=0)
    image_feature_cache_mb: int = param(
        4096,
        "MiB of (frozen) vision features kept between steps, on the device; 0: encode every step.",
        low=0,
    )
    progress: bool = param(False, "Print each step's log row.")
    log_dir: str | None = param(None, "Where train_log.csv/.json go (none: --out).")

    def signature(self) -> dict[str, Any]:
        """What must not change between a run and its resumption (not where it runs or how often it saves)."""
        import json
        from dataclasses import asdict

        # Gradient checkpointing spends time for memory and computes the same update: a run that ran out
        # of memory resumes with it on.
        skip = {"out", "device", "checkpoint_every", "progress", "log_dir", "gradient_checkpointing"}
        return json.loads(json.dumps({key: value for key, value in asdict(self).items() if key not in skip}))


@dataclass(kw_only=True)
class FinetuneConfig(ModelOptions, DataOptions):
    """finetune: the full model, fine-tuned from --origin on every person of the benchmark as MLLMU-Bench's
    finetune.py does it (LoRA on the language model's linear layers, merged), saved as a whole checkpoint.

    --model names what it writes (params.yaml `model`, which every later stage loads); the prompt template
    and closing token are the full model's, so it is asked as it learned. Defaults: finetune.py and the
    README command of MLLMU-Bench (lr 2e-5, batch 4, 5 epochs, LoRA r 16 / alpha 16 / dropout 0.05, AdamW,
    linear decay without warmup).
    """

    origin: str = param(help="The released checkpoint fine-tuned from (folder or hub id), e.g. llava-hf's.")
    out: str | None = param(None, "Where the merged full model goes (none: --model).")
    splits: tuple[str, ...] = param(
        (),
        "Comma list of the training data's splits learned (none: the forget split and its retain split, "
        "every fictitious person of MLLMU-Bench's training rows).",
    )
    sample_kinds: tuple[str, ...] = param(("qa",), "Comma list of sample kinds: qa, generation, mc, cloze.")
    lr: float = param(2e-5, "AdamW learning rate.", low=0, low_open=True)
    batch_size: int = param(4, "Samples per optimizer step.", low=1)
    epochs: int = param(5, "Passes over the samples.", low=1)
    lora_rank: int = param(16, "LoRA rank r.", low=1)
    lora_alpha: int = param(16, "LoRA alpha.", low=1)
    lora_dropout: float = param(0.05, "LoRA dropout.", low=0, high=1)
    lora_targets: str = param(
        "linear", "What LoRA adapts in the language model.", choices=("attention", "linear")
    )
    gradient_checkpointing: bool = param(
        False, "Recompute each decoder layer's activations in the backward pass instead of keeping them."
    )
    seed: int = param(0, "Seeds LoRA's initialisation, dropout and the data order.")
    checkpoint_every: int = param(0, "Optimizer steps between checkpoints; 0: never.", low=0)
    progress: bool = param(False, "Print each step's log row.")


@dataclass(kw_only=True)
class RelearnConfig(ModelOptions, DataOptions):
    """relearn: the relearning attack, fine-tuning an unlearned adapter on the QA of part of the forget
    people; evaluate --relearned scores the others (docs/evaluation.md, "Relearning attack")."""

    adapter: str | None = param(
        None,
        "The unlearned LoRA adapter, trained on further (none: a fresh adapter on --model, the control).",
    )
    out: str = param(help="The relearned adapter's directory (PEFT, training_meta.json names its people).")
    fraction: float = param(
        0.25, "Share of the forget people relearned on (at least one, at least one held out).",
        low=0, high=1, low_open=True,
    )  # fmt: skip
    split_seed: int = param(0, "Seeds which people are relearned on: the same for every method and seed.")
    sample_kinds: tuple[str, ...] = param(("qa",), "What the attacker trains on: qa, generation, mc, cloze.")
    lr: float = param(5e-4, "AdamW learning rate.", low=0, low_open=True)
    batch_size: int = param(4, "Samples per optimizer step.", low=1)
    epochs: int = param(2, "Passes over the relearned people's samples.", low=1)
    lora_rank: int = param(8, "LoRA rank of the fresh adapter (no --adapter).", low=1)
    lora_alpha: int = param(16, "LoRA alpha of the fresh adapter (no --adapter).", low=1)
    gradient_checkpointing: bool = param(
        False, "Recompute each decoder layer's activations in the backward pass instead of keeping them."
    )
    seed: int = param(0, "Seeds the data order and dropout (and a fresh adapter's initialisation).")
    progress: bool = param(False, "Print each step's log row.")


@dataclass(kw_only=True)
class EvaluateConfig(ModelOptions, DataOptions):
    """evaluate: MLLMU-Bench's measures for a model (+ a LoRA adapter), per split."""

    out: str = param(help="metrics.json of the run, e.g. results/runs/<run>/metrics.json")
    adapter: str | None = param(None, "LoRA adapter directory to evaluate on top of --model.")
    protocol: str = param("fixed", "Prompt protocol (docs/evaluation.md).", choices=("fixed", "official"))
    mc_scoring: str = param(
        "generate",
        "Multiple choice: generate the letter and parse it (eval.py) | likelihood: the option of highest "
        "log P(option | image, question), MLLMU-Bench Eq. 13 (no generation, no exemplars).",
        choices=("generate", "likelihood"),
    )
    max_new_tokens: int = param(50, "Greedy generation length.", low=1)
    batch_size: int = param(8, "Questions per batch (generated, or scored by likelihood).", low=1)
    merge_adapter: bool = param(
        True,
        "Answer with the LoRA adapter merged into the weights (no LoRA matmuls per token; the base weights "
        "are restored exactly afterwards). Replies may differ from unmerged ones in the last float bits.",
    )
    reverse_attack: bool = param(True, "Also score forget/test with Vgid's reverse prompt appended.")
    gib_model: str | None = param(None, "Local copy of the gibberish classifier (none: the offline scorer).")
    limit: int | None = param(None, "At most this many people per split.", low=1)
    seed: int = param(0, "Seeds the few-shot draws.")
    mc_few_shot_profiles: int | None = param(
        None, "Exemplar profiles before multiple-choice questions (none: the protocol's).", low=0
    )
    cloze_few_shot_profiles: int | None = param(
        None, "Exemplar profiles before cloze questions (none: the protocol's).", low=0
    )
    few_shot_questions: int | None = param(
        None, "At most this many exemplar questions, 0 = all (none: the protocol's).", low=0
    )
    max_exemplar_images: int | None = param(
        None,
        "At most this many exemplar images per prompt, the first ones (none: the protocol's; official: 4, "
        "so its prompts fit LLaVA-1.5's 4,096 positions).",
        low=0,
    )
    instruction: str | None = param(None, "In-context unlearning prefix for every question (ICU).")
    splits: tuple[str, ...] = param(
        (), "Comma list of split roles (none: the layout's, e.g. forget,test,retain,real for MLLMU-Bench)."
    )
    mia_nonmembers: str | None = param(
        None,
        "Split of never-seen people for membership inference against the forget split's QA "
        "(pipeline.evaluation.membership), e.g. the mini world's `unseen`; none: skip it (MLLMU-Bench and CLEAR "
        "have no such split: docs/evaluation.md).",
    )
    relearned: str | None = param(
        None,
        "Adapter after the relearning attack on this model (pipeline relearn): the forget people it did not "
        "relearn on are scored as forget_heldout (this model) and forget_relearned (that adapter).",
    )
    shard_index: int | None = param(
        None, "Generate only this shard's batches into a journal beside --out, for the merging run.", low=0
    )
    num_shards: int = param(
        1, "Shards the generation is split into; without --shard-index: merge the shards' and score.", low=1
    )
    references: str | None = param(
        None, "Folder holding references/people/, the token plot's H(R_i) (none: beside --data)."
    )
    token_sample_index: int = param(
        0, "Which image question of the forget split token_probs.json follows (modulo their count).", low=0
    )
    progress: bool = param(True, "Show a progress bar.")


@dataclass(kw_only=True)
class ReportConfig:
    """report: the papers' tables (means and spread over seeds), the findings and the figures."""

    runs: str = param("results/runs", "Folder of <run>/metrics.json (run names: method or method-sN).")
    out: str = param("results/report.md", "The report's Markdown file.")
    epsilon: float = param(
        KEY_TOKEN_EPSILON, "Key-token entropy threshold H(R_i) >= epsilon (nats; ViKeR Def. 2).", low=0
    )
    token_plot: bool = param(True, "Draw the per-token probability plot (from the runs' token_probs.json).")


# params.yaml's sections of options that several commands share: `model` (how every stage that runs the
# full model loads it), `data` (where every stage that reads a split finds it) and `caches` (where the
# teacher caches precompute writes and train reads are).
SHARED_SECTIONS: dict[str, type] = {"model": ModelOptions, "data": DataOptions, "caches": CacheOptions}

# The params.yaml section of each command.
SECTIONS: dict[str, type] = {
    "prepare-mini": PrepareConfig,
    "finetune": FinetuneConfig,
    "precompute": PrecomputeConfig,
    "train": TrainConfig,
    "relearn": RelearnConfig,
    "evaluate": EvaluateConfig,
    "report": ReportConfig,
}

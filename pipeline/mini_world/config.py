"""The mini world's settings: the world's sizes, the tiny model's architecture and its fine-tune.

Plain dataclasses with no heavy imports: the command line is generated from them (stages.config).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import param


@dataclass(frozen=True)
class WorldConfig:
    """Sizes and seed of the mini world. Tests build a reduced world by lowering the counts."""

    seed: int = param(0, "Seeds the world (people, images, splits) and the full model's fine-tune.")
    num_people: int = param(100, "Fictitious people, split into forget_K / retain_(100-K).", low=2)
    num_real: int = param(20, "The 'real celebrity' group (Retain_Set), always retained.", low=0)
    num_reference_people: int = param(20, "Portraits in no split: ViKeR's 'people' reference pool.", low=0)
    alt_images: int = param(3, "Alternative images per fictitious person (Test_Set `images`).", low=1)
    num_pets: int = param(20, "Images in the `pets` reference pool.", low=0)
    num_scenes: int = param(20, "Images in the `scene` reference pool.", low=0)
    num_patterns: int = param(20, "Images in the `pattern` reference pool.", low=0)
    image_size: int = param(64, "Side of every drawn image, in pixels.", low=8)
    forget_ratios: tuple[int, ...] = param((5, 10, 15), "Forget percentages K of the forget_K splits.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "forget_ratios", tuple(int(ratio) for ratio in self.forget_ratios))
        if self.num_people < 2:
            raise ValueError("WorldConfig.num_people must be >= 2 (a forget and a retain person)")
        if self.alt_images < 1:
            raise ValueError("WorldConfig.alt_images must be >= 1")
        if any(not 0 < ratio < 100 for ratio in self.forget_ratios):
            raise ValueError(f"forget ratios must lie in (0, 100), got {self.forget_ratios}")


@dataclass(frozen=True)
class TinyLlavaConfig:
    """The tiny LLaVA-1.5 architecture (CLIP tower + Llama) of the embedded full model."""

    vocab_size: int = param(1024, "BPE vocabulary trained on the world's text.", low=64)
    vision_image_size: int = param(32, "Side of the vision tower's input image, in pixels.", low=8)
    patch_size: int = param(8, "Vision patch side: (vision_image_size / patch_size)^2 image tokens.", low=1)
    vision_hidden: int = param(64, "Vision tower width.", low=8)
    vision_layers: int = param(2, "Vision tower layers.", low=1)
    text_hidden: int = param(128, "Language model width.", low=8)
    text_layers: int = param(2, "Language model layers.", low=1)
    text_heads: int = param(4, "Language model attention heads.", low=1)
    text_intermediate: int = param(384, "Language model MLP width.", low=8)
    max_positions: int = param(1024, "Language model context length.", low=64)


@dataclass
class FineTuneConfig:
    """How the tiny model is fine-tuned until it has memorized the world (the full model)."""

    # A tiny model that meets all formats at once stalls for many epochs on template tokens before it
    # binds people to facts; once it knows the facts, the other formats are quick to add.
    fact_epochs: int = param(20, "First epochs on the facts alone (profile QA and cloze items).", low=0)
    epochs: int = param(25, "Epochs on every task format, after the fact epochs.", low=0)
    batch_size: int = param(16, "Fine-tuning examples per step.", low=1)
    # Higher rates learn the answer templates sooner but hold the facts back (docs/mini-world.md).
    learning_rate: float = param(5e-4, "Peak AdamW learning rate.", low=0, low_open=True)
    weight_decay: float = param(0.01, "AdamW weight decay.", low=0)
    warmup_fraction: float = param(0.05, "Fraction of the steps with a linear warmup.", low=0, high=1)
    final_lr_fraction: float = param(
        0.0, "After warmup a cosine decays the rate to this fraction.", low=0, high=1
    )
    adam_beta2: float = param(0.999, "AdamW beta2.", low=0, high=1)
    # The tiny model learns the answer formats by fine-tuning and is evaluated zero-shot.
    fewshot_probability: float = param(0.0, "Share of training prompts with solved exemplars.", low=0, high=1)
    # Likelihood scoring (MLLMU-Bench Eq. 13) asks the bare question and compares the options' words, so
    # the model must have learned to answer with them; eval.py's scoring asks for the letter.
    mc_format: str = param(
        "option",
        "Multiple choice in training: option (the correct option's words after the bare question, what "
        "likelihood scoring reads) | letter (the options listed, answered by the letter) | both.",
        choices=("option", "letter", "both"),
    )
    # Recognizing a person in other pictures and answering reworded questions must be learned from
    # variation; the Test_Set's own images and wordings stay unseen.
    augment: bool = param(
        True, "Train on freshly shifted, rescaled, recoloured and noisy copies of each image."
    )
    paraphrases: bool = param(
        True, "Ask each training question in a randomly chosen wording of pipeline.mini_world.text's."
    )
    # Shuffled options force matching the attribute rather than recalling the letter; a tiny model learns
    # that slowly, so the mini default keeps the data set's order.
    permute_options: bool = param(False, "Shuffle multiple-choice options in training prompts.")
    threads: int = param(0, "torch threads (0: torch's default).", low=0)
    model: TinyLlavaConfig = param(default_factory=TinyLlavaConfig)

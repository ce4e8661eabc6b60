"""Qwen2-VL / Qwen2.5-VL through the model adapter layer, on tiny random models of the real classes.

The reference for the logits is built by hand, independently of pipeline code and of the model's own
position code: the prompt as the official chat template writes it, image pads counted from the
image processor's grid, and the 3-D M-RoPE positions written out from the rule in the Qwen2-VL paper
(text tokens count up on all three axes; an image's tokens sit at (s, s + row, s + column) for the
merged patch grid; the text after it resumes at s + max(rows, columns)).
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch
from builders import build_random_tiny_qwen2_vl, reduced_config
from PIL import Image

from pipeline.mini_world.world import write_world
from pipeline.models import (
    PromptedSample,
    answer_logits,
    answer_token_ids,
    encode_answers,
    generate,
    load_model,
)
from pipeline.models.batching import _encode_model_inputs
from stages.cli import main

VARIANTS = ["qwen2_vl", "qwen2_5_vl"]
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module", params=VARIANTS)
def qwen_dir(request, tmp_path_factory):
    return build_random_tiny_qwen2_vl(tmp_path_factory.mktemp(request.param) / "model", 0, request.param)


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return load_model(str(qwen_dir))


def _images():
    # 64x64 -> 32x32 -> 8x8 patches -> 4x4 merged = 16 tokens; 48x64 (h x w) -> 24x32 -> 3x4 merged = 12
    # tokens on a non-square grid, so height and width positions differ.
    return Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (64, 48), (10, 200, 10))


def _samples(family):
    red, green = _images()
    return [
        PromptedSample(
            family.build_prompt("What is the occupation of this person?", True),
            red,
            "This person works as a civil engineer.",
        ),
        PromptedSample(family.build_prompt("Where was Mara Holt born?", False), None, "In Copenhagen."),
        PromptedSample(
            family.build_prompt("What is this person's hobby?", True, "Forget."), green, "painting"
        ),
        # A few-shot exemplar image before the query image: two images in one row.
        PromptedSample(
            family.build_prompt("Who is it?", True, exemplars=family.image_placeholder + "A\n"),
            red,
            "B",
            (green,),
        ),
    ]


def _hand_built(loaded, user_text: str, images: list[Image.Image], answer: str):
    """input_ids, pixel inputs and 3-D positions of one unpadded prompt + answer, built by hand."""
    tokenizer, image_processor = loaded.tokenizer, loaded.processor.image_processor
    pixels = image_processor(images=images, return_tensors="pt")
    ids: list[int] = []
    positions: list[tuple[int, int, int]] = []
    next_position = 0

    def add_text(text: str) -> None:
        nonlocal next_position
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            ids.append(token)
            positions.append((next_position,) * 3)
            next_position += 1

    add_text(SYSTEM + "<|im_start|>user\n")
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for _, height, width in pixels["image_grid_thw"].tolist():
        add_text("<|vision_start|>")
        rows, columns = height // 2, width // 2  # 2x2 patches merge into one token
        for row in range(rows):
            for column in range(columns):
                ids.append(pad)
                positions.append((next_position, next_position + row, next_position + column))
        next_position += max(rows, columns)
        add_text("<|vision_end|>")
    add_text(user_text + "<|im_end|>\n<|im_start|>assistant\n" + answer + "<|im_end|>")
    position_ids = torch.tensor(positions).T[:, None, :]  # (3, batch 1, T)
    return torch.tensor([ids]), pixels, position_ids


def test_prompt_equals_the_official_chat_template(qwen):
    family, tokenizer = qwen.family, qwen.tokenizer
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Forget.\nWho?"}]}]
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Who?"}]}]
    # A solved exemplar (its image, then its text) inside the user turn, before the query's image.
    few_shot = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Who? A\n"}, {"type": "image"}, {"type": "text", "text": "Who?"},
    ]}]  # fmt: skip
    for messages, prompt in (
        (with_image, family.build_prompt("Who?", True, instruction="Forget.")),
        (text_only, family.build_prompt("Who?", False)),
        (few_shot, family.build_prompt("Who?", True, exemplars=family.image_placeholder + "Who? A\n")),
    ):
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    assert prompt.startswith(SYSTEM)
    assert answer_token_ids(qwen, "Paris")[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(answer_token_ids(qwen, "Paris")[:-1]) == "Paris"  # no leading space


def test_logits_equal_the_hand_built_reference(qwen):
    red, green = _images()
    cases = [  # (question, instruction, image, answer)
        ("What is the occupation of this person?", None, red, "This person works as a civil engineer."),
        ("What is this person's hobby?", "Forget.", green, "painting"),
    ]
    samples = [
        PromptedSample(qwen.family.build_prompt(question, True, instruction), image, answer)
        for question, instruction, image, answer in cases
    ]
    # After a longer two-image sample: the cases are left-padded and their grids are the batch's 3rd, 4th.
    batch = encode_answers(qwen, [_samples(qwen.family)[3], *samples])
    assert batch.inputs["attention_mask"][1:].eq(0).any(), "the cases must be left-padded"
    with torch.no_grad():
        ours = batch.per_sample(answer_logits(qwen.model, batch))[1:]
        for (question, instruction, image, answer), logits in zip(cases, ours, strict=True):
            user_text = f"{instruction}\n{question}" if instruction else question
            input_ids, pixels, position_ids = _hand_built(qwen, user_text, [image], answer)
            full = qwen.model(input_ids=input_ids, position_ids=position_ids, **pixels).logits[0]
            length = len(answer_token_ids(qwen, answer))
            assert torch.allclose(logits, full[-length - 1 : -1], atol=1e-5)


def test_left_padded_batch_equals_each_sample_alone(qwen):
    samples = _samples(qwen.family)
    text_only = [
        PromptedSample(qwen.family.build_prompt("Where was Mara Holt born?", False), None, "Copenhagen."),
        PromptedSample(qwen.family.build_prompt("Hobby?", False), None, "This person enjoys chess."),
    ]
    for group in (samples, text_only):  # text-only batches take another position path in the model
        batch = encode_answers(qwen, group)
        if group is samples:  # with images the model derives 3-D positions itself: none may be forced on it
            assert "position_ids" not in batch.inputs
        else:  # without, it would number the padding: each row gets its unpadded positions 0..n-1
            mask = batch.inputs["attention_mask"].bool()
            for row in range(len(group)):
                positions = batch.inputs["position_ids"][row][mask[row]]
                assert positions.tolist() == list(range(int(mask[row].sum())))
        with torch.no_grad():
            batched = batch.per_sample(answer_logits(qwen.model, batch))
            for sample, logits in zip(group, batched, strict=True):
                alone = answer_logits(qwen.model, encode_answers(qwen, [sample]))
                assert torch.allclose(logits, alone, atol=1e-5)


def test_encoded_samples_equal_encoding_every_step(qwen, check_encoded_samples):
    check_encoded_samples(qwen, _samples(qwen.family))


def test_image_pads_follow_the_image_grid(qwen):
    batch = encode_answers(qwen, _samples(qwen.family))
    pad = qwen.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grids = batch.inputs["image_grid_thw"].tolist()
    assert grids == [[1, 8, 8], [1, 6, 8], [1, 6, 8], [1, 8, 8]]  # red, green, green (exemplar), red
    assert batch.inputs["input_ids"].eq(pad).sum(dim=1).tolist() == [16, 0, 12, 12 + 16]
    assert torch.equal(batch.inputs["mm_token_type_ids"], batch.inputs["input_ids"].eq(pad).long())
    with pytest.raises(ValueError, match="2 images"):
        qwen.family.encode_prompts(qwen.processor, [qwen.family.build_prompt("Q", True)], list(_images()))


def test_mm_token_type_ids_decide_the_positions(qwen):
    batch = encode_answers(qwen, _samples(qwen.family))
    without = {key: value for key, value in batch.inputs.items() if key != "mm_token_type_ids"}
    with torch.no_grad():
        correct = answer_logits(qwen.model, batch)
        if qwen.family.name == "qwen2_vl":
            with pytest.raises(ValueError, match="mm_token_type_ids"):
                qwen.model(**without)
            return
        # Qwen2.5-VL runs without them, on 1-D positions over the padded rows: silently other logits.
        batch.inputs = without
        wrong = answer_logits(qwen.model, batch)
    # Random tiny weights give logits of size ~0.3; the batched-vs-alone tolerance elsewhere is 1e-5.
    assert (wrong - correct).abs().max() > 1e-3


def test_lora_targets_only_the_language_model_attention(qwen_dir):
    from peft import LoraConfig, get_peft_model

    loaded = load_model(str(qwen_dir))
    module_names = [name for name, _ in loaded.model.named_modules()]
    assert any(name.endswith("visual.blocks.0.attn.qkv") for name in module_names)
    peft_model = get_peft_model(
        loaded.model, LoraConfig(r=4, target_modules=loaded.family.lora_target_modules)
    )
    adapted = sorted(name for name, module in peft_model.named_modules() if hasattr(module, "lora_A"))
    layers = loaded.model.config.text_config.num_hidden_layers
    assert len(adapted) == 4 * layers
    for name in adapted:
        assert ".language_model.layers." in name and name.split(".")[-1] in {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
        }
    assert not any("visual" in name for name, p in peft_model.named_parameters() if p.requires_grad)


def test_llava_lora_regex_excludes_the_clip_tower(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    loaded = load_model(str(tiny_model_dir))
    clip_projections = [
        name
        for name, _ in loaded.model.named_modules()
        if "vision_tower" in name and name.split(".")[-1] in {"q_proj", "v_proj"}
    ]
    assert clip_projections, (
        "the tiny LLaVA must have CLIP attention projections for this test to mean anything"
    )
    peft_model = get_peft_model(
        loaded.model, LoraConfig(r=4, target_modules=loaded.family.lora_target_modules)
    )
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == 4 * loaded.model.config.text_config.num_hidden_layers
    assert all(".language_model." in name and "vision_tower" not in name for name in adapted)


def test_generate_is_greedy_decoding_and_batch_invariant(qwen):
    samples = [PromptedSample(s.prompt, s.image, None, s.context_images) for s in _samples(qwen.family)]
    together = generate(qwen, samples, max_new_tokens=4, batch_size=4)
    assert together == [generate(qwen, [s], max_new_tokens=4)[0] for s in samples]
    # Cached decoding (positions from the stored rope deltas) equals full forward passes without a cache.
    sample = samples[3]
    end = qwen.family.end_token_ids(qwen.tokenizer)
    new_tokens: list[int] = []
    with torch.no_grad():
        for _ in range(4):
            inputs = _encode_model_inputs(qwen, [sample.prompt], sample.images, [new_tokens])
            next_token = int(qwen.model(**inputs).logits[0, -1].argmax())
            if next_token in end:
                break
            new_tokens.append(next_token)
    assert together[3] == qwen.tokenizer.decode(new_tokens, skip_special_tokens=True)


def test_a_checkpoint_with_another_chat_template_is_reported(qwen_dir, tmp_path):
    copy = shutil.copytree(qwen_dir, tmp_path / "model")
    template = copy / "chat_template.jinja"
    official = template.read_text()
    for other, expected in (
        (official.replace("You are a helpful assistant.", "You are terse."), "You are terse."),
        # A text-only template cannot render image content: reported, not a crash.
        ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + m['content'] }}{% endfor %}", "an error"),
    ):
        template.write_text(other)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_model(str(copy))
        assert any(expected in str(warning.message) for warning in caught)


def test_precompute_train_evaluate_run_on_qwen(qwen, qwen_dir, tmp_path):
    import json
    import math

    from safetensors import safe_open

    from cache import iter_cache, read_manifest
    from pipeline.benchmarks.mllmu import load_unlearning_samples
    from stages.config import EvaluateConfig, PrecomputeConfig, TrainConfig
    from stages.evaluate import run as evaluate
    from stages.precompute import run as precompute
    from stages.train import run as train

    write_world(tmp_path / "world", reduced_config())
    data, model = str(tmp_path / "world" / "data"), str(qwen_dir)
    precompute(
        PrecomputeConfig(model=model, data=data, out=str(tmp_path / "cache"), args={"k": 2}, batch_size=4)
    )
    manifest = read_manifest(tmp_path / "cache")
    assert manifest.header["model_family"] == qwen.family.name
    samples = {s.sample_id: s for s in load_unlearning_samples(data, "forget_10", ("qa",))}
    rows = list(iter_cache(tmp_path / "cache"))
    assert sorted(row.sample_id for row in rows) == sorted(samples)
    for row in rows:  # the cached answer tokens are exactly the student's, <|im_end|> included
        assert row.answer_token_ids.tolist() == answer_token_ids(qwen, samples[row.sample_id].answer)

    meta = train(
        TrainConfig(
            model=model,
            data=data,
            out=str(tmp_path / "adapter"),
            forget_cache=str(tmp_path / "cache"),
            max_steps=2,
        )
    )
    assert meta["steps"] == 2 and math.isfinite(meta["final_loss"])
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as adapter:
        names = list(adapter.keys())
    assert names and all(".language_model.layers." in name and "visual" not in name for name in names)

    metrics = evaluate(
        EvaluateConfig(
            model=model,
            adapter=str(tmp_path / "adapter"),
            data=data,
            out=str(tmp_path / "metrics.json"),
            limit=1,
            max_new_tokens=4,
            reverse_attack=False,
            progress=False,
        )
    )
    for split in ("forget", "test", "retain", "real"):
        assert metrics[split] and all(math.isfinite(value) for value in metrics[split].values())
    tokens = json.loads(
        (tmp_path / "token_probs.json").read_text()
    )  # the world's people pool is beside its data
    assert len(tokens["tokens"]) == len(tokens["entropy"]) == len(tokens["probabilities"]) > 1
    assert (
        all(math.isfinite(h) and h >= 0 for h in tokens["entropy"]) and tokens["tokens"][-1] == "<|im_end|>"
    )


def test_cli_loading_options_reach_load_model(qwen_dir, tmp_path, monkeypatch):
    """--attn-implementation and --trust-remote-code are config fields that reach load_model as arguments."""
    from click.testing import CliRunner

    import stages.precompute
    from pipeline import models

    write_world(tmp_path / "world", reduced_config())
    seen = []

    def recording_load_model(*args, **kwargs):
        loaded = models.load_model(*args, **kwargs)
        seen.append((loaded.model.config._attn_implementation, kwargs["trust_remote_code"]))
        return loaded

    monkeypatch.setattr(stages.precompute, "load_model", recording_load_model)
    common = [
        "precompute",
        "--model",
        str(qwen_dir),
        "--data",
        str(tmp_path / "world" / "data"),
        "--arg",
        "k=1",
    ]
    common += ["--limit", "2", "--dtype", "bf16", "--no-progress"]
    for options in (["--attn-implementation", "eager", "--trust-remote-code"], []):
        result = CliRunner().invoke(
            main, ["--params", os.devnull, *common, "--out", str(tmp_path / f"cache{len(options)}"), *options]
        )
        assert result.exit_code == 0, result.output
    assert seen[0] == ("eager", True)
    assert seen[1] == ("sdpa", False)  # unset: transformers' default kernel, and no remote code


def test_the_vision_feature_cache_encodes_each_qwen_image_once(qwen):
    """Qwen's packed patches are split per image by image_grid_thw: each keyed image goes through the
    vision tower once, and the logits equal those of the model encoding every image (issue 29, item 11)."""
    from pipeline.models import VisionFeatureCache

    samples = _samples(qwen.family)
    keys = ["red", "green", "green", "red"]  # the batch's images in order (the 4th sample: exemplar, query)
    encoded_grids = []
    hook = qwen.model.model.visual.register_forward_hook(
        lambda module, args, kwargs, output: encoded_grids.append(len(kwargs["grid_thw"])), with_kwargs=True
    )
    try:
        with torch.no_grad():
            plain = answer_logits(qwen.model, encode_answers(qwen, samples))
            assert encoded_grids == [4]
            cache = VisionFeatureCache(qwen.model)
            assert cache.enabled
            for _ in range(2):
                batch = encode_answers(qwen, samples)
                kwargs = cache.model_kwargs(batch.inputs, keys)
                assert "pixel_values" not in batch.inputs and "image_grid_thw" in batch.inputs
                torch.testing.assert_close(
                    answer_logits(qwen.model, batch, **kwargs), plain, atol=1e-5, rtol=0
                )
    finally:
        hook.remove()
    assert encoded_grids == [4, 2]  # red and green once, then every image from the cache
    assert (cache.encoded, cache.reused) == (2, 6)


def test_max_pixels_caps_a_large_photo_s_image_tokens(qwen_dir, tiny_model_dir):
    """A 3000 x 2000 photo becomes at most max_pixels / 8² tokens of the tiny model (4 px patches, 2 x 2
    merged; the real models: 28² px a token), whatever the checkpoint's own cap; a fixed-size family
    refuses the option by name (issue 29, item 11)."""
    photo = Image.new("RGB", (3000, 2000), (120, 80, 40))
    pad = "<|image_pad|>"
    tokens_at = {}
    for max_pixels in (None, 256, 4096):
        loaded = load_model(str(qwen_dir), max_pixels=max_pixels)
        prompt = loaded.family.build_prompt("Who is it?", True)
        batch = encode_answers(loaded, [PromptedSample(prompt, photo, "A")])
        tokens = int(batch.inputs["input_ids"].eq(loaded.tokenizer.convert_tokens_to_ids(pad)).sum())
        tokens_at[max_pixels] = tokens
    assert tokens_at[None] <= 32 * 32 // 64  # the tiny checkpoint's own cap: 32 x 32 px
    assert tokens_at[256] <= 256 // 64 and 32 * 32 // 64 < tokens_at[4096] <= 4096 // 64
    with pytest.raises(ValueError, match="max_pixels"):
        load_model(str(tiny_model_dir), max_pixels=4096)

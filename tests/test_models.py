"""The model adapter layer: left-padded teacher forcing equals the unpadded model, reload is exact."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipeline.models import (
    PromptedSample,
    answer_logits,
    answer_token_ids,
    encode_answers,
    generate,
    load_model,
)


def _samples(family):
    red, green = Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (48, 64), (10, 200, 10))
    return [
        PromptedSample(
            family.build_prompt("What is the occupation of this person?", True),
            red,
            "This person works as a civil engineer.",
        ),
        PromptedSample(family.build_prompt("Where was Mara Holt born?", False), None, "In Copenhagen."),
        PromptedSample(
            family.build_prompt("What is this person's hobby?", True, instruction="Forget."),
            green,
            "painting",
        ),
    ]


def test_batched_answer_logits_equal_each_sample_alone(tiny_model):
    samples = _samples(tiny_model.family)
    batch = encode_answers(tiny_model, samples)
    with torch.no_grad():
        batched = batch.per_sample(answer_logits(tiny_model.model, batch))
        for index, sample in enumerate(samples):
            single = encode_answers(tiny_model, [sample])
            inputs = {k: v for k, v in single.inputs.items() if k != "position_ids"}
            full = tiny_model.model(**inputs).logits[0]
            length = single.answer_lengths[0]
            reference = full[-length - 1 : -1]
            assert torch.allclose(batched[index], reference, atol=1e-5)
            assert single.inputs["input_ids"][0, -length:].tolist() == answer_token_ids(
                tiny_model, sample.answer
            )
    assert batch.targets.tolist() == sum((answer_token_ids(tiny_model, s.answer) for s in samples), [])
    assert batch.sample_index.tolist() == sum(([i] * n for i, n in enumerate(batch.answer_lengths)), [])


def test_encoded_samples_equal_encoding_every_step(tiny_model, check_encoded_samples):
    family = tiny_model.family
    exemplar = Image.new("RGB", (64, 64), (10, 10, 200))
    with_exemplar = PromptedSample(
        family.build_prompt("Who is it?", True, exemplars=family.image_placeholder + " A\n"),
        exemplar,
        "B",
        (exemplar,),
    )
    check_encoded_samples(tiny_model, [*_samples(family), with_exemplar])


def test_answer_ends_with_eos_and_empty_answer_is_refused(tiny_model):
    ids = answer_token_ids(tiny_model, "painting")
    assert ids[-1] == tiny_model.tokenizer.eos_token_id
    try:
        answer_token_ids(tiny_model, "   ")
    except ValueError as error:
        assert "empty answer" in str(error)
    else:
        raise AssertionError("an empty answer must be refused")


def test_save_and_reload_give_identical_logits(tiny_model, tiny_model_dir):
    reloaded = load_model(str(tiny_model_dir))
    batch = encode_answers(tiny_model, _samples(tiny_model.family))
    with torch.no_grad():
        assert torch.equal(answer_logits(tiny_model.model, batch), answer_logits(reloaded.model, batch))
    assert reloaded.model_fingerprint == tiny_model.model_fingerprint
    assert reloaded.tokenizer_fingerprint == tiny_model.tokenizer_fingerprint


def test_generate_returns_only_new_text_and_is_batch_invariant(tiny_model):
    samples = [PromptedSample(s.prompt, s.image) for s in _samples(tiny_model.family)]
    together = generate(tiny_model, samples, max_new_tokens=6, batch_size=3)
    alone = [generate(tiny_model, [s], max_new_tokens=6)[0] for s in samples]
    assert together == alone
    assert all("ASSISTANT" not in reply for reply in together)


def test_vision_feature_cache_keeps_what_fits_and_gives_every_image_its_features(tiny_model):
    from pipeline.models import VisionFeatureCache

    size = tiny_model.model.config.vision_config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_model.model.model.get_image_features(
            pixel_values=pixels, return_dict=True
        ).pooler_output
    one_image = expected[0].numel() * expected[0].element_size()
    cache = VisionFeatureCache(tiny_model.model, max_bytes=one_image)  # room for one image's features
    assert cache.enabled

    def features(images: list[int], keys: list[str | None]) -> None:
        """The features handed to the model are each image's own, kept or fresh."""
        kwargs = cache.model_kwargs({"pixel_values": pixels[images]}, keys)
        handed = kwargs["mm_encoder_outputs"]["image"].pooler_output
        assert len(handed) == len(images)
        for feature, image in zip(handed, images, strict=True):
            torch.testing.assert_close(feature, expected[image])

    features([0, 1, 0, 2], ["a", "b", "a", None])  # "a" twice in one batch: encoded once
    assert list(cache.features) == ["a"] and cache.bytes == one_image  # full: "b" is not kept
    assert (cache.encoded, cache.reused) == (3, 1)
    features([1, 0], ["b", "a"])  # "a" kept, "b" encoded again
    assert list(cache.features) == ["a"] and (cache.encoded, cache.reused) == (4, 2)


def test_the_model_fingerprint_covers_the_image_preprocessing(tiny_model_dir, tmp_path):
    """The same weights with another image_mean compute other probabilities: another fingerprint."""
    import json
    import shutil

    from pipeline.models import model_fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert model_fingerprint(copy) == model_fingerprint(tiny_model_dir)
    config_path = copy / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"]["image_mean"] = [0.1, 0.2, 0.3]
    config_path.write_text(json.dumps(config))
    assert model_fingerprint(copy) != model_fingerprint(tiny_model_dir)


def test_a_tokenizer_that_splits_prompt_and_answer_differently_is_named(tiny_model):
    """A legacy SentencePiece tokenizer puts a spurious "▁" before a separately tokenized answer."""
    from types import SimpleNamespace

    from pipeline.models import TokenizationError, check_joint_tokenization

    prompt = tiny_model.family.build_prompt("Where was she born?", True)
    # The mini model's tokenizer splits cleanly.
    check_joint_tokenization(tiny_model, "s/1", prompt, "She was born in Lisbon.")

    def legacy(text, add_special_tokens=False):
        ids = tiny_model.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": ids if text.startswith("USER") else [7, *ids]}  # 7 stands for the spurious "▁"

    loaded = SimpleNamespace(tokenizer=legacy, family=tiny_model.family)
    with pytest.raises(
        TokenizationError, match=r"sample s/1: the answer 'She was born in Lisbon.' tokenizes"
    ):
        check_joint_tokenization(loaded, "s/1", prompt, "She was born in Lisbon.")


def test_close_answers_off_drops_the_closing_token_from_teacher_forcing(tiny_model):
    """MLLMU-Bench fine-tuned without a closing token; an experiment can teacher-force answers likewise."""
    from dataclasses import replace as with_fields

    from pipeline.models import answer_token_ids

    closed = answer_token_ids(tiny_model, "She was born in Lisbon.")
    open_ended = answer_token_ids(with_fields(tiny_model, close_answers=False), "She was born in Lisbon.")
    assert closed == [*open_ended, tiny_model.tokenizer.eos_token_id]


def test_the_llava_family_writes_mllmu_benchs_prompt_when_asked():
    """MLLMU-Bench's fine-tuned LLaVA was trained on `USER: <image>\\n{question}\\nASSISTANT: {answer}`."""
    from pipeline.models import LlavaFamily

    assert LlavaFamily().build_prompt("Q?", True) == "USER: <image>\nQ? ASSISTANT:"
    assert LlavaFamily(template="mllmu-bench").build_prompt("Q?", True) == "USER: <image>\nQ?\nASSISTANT:"
    assert (
        LlavaFamily(template="mllmu-bench").build_prompt("Q?", False, "Forget.")
        == "USER: Forget.\nQ?\nASSISTANT:"
    )
    with pytest.raises(
        ValueError, match="prompt template 'chat' is not one of the llava family's: llava, mllmu-bench"
    ):
        LlavaFamily(template="chat")


def _settled_copy(model_dir, target):
    """A copy of a model folder whose files were last written an hour ago."""
    import os
    import shutil
    import time

    shutil.copytree(model_dir, target)
    for file in target.iterdir():
        os.utime(file, (time.time() - 3600, time.time() - 3600))
    return target


def test_the_fingerprint_is_read_once_per_unchanged_model(tiny_model_dir, tmp_path, monkeypatch):
    """A second fingerprint of the same files reads no file; a rewritten or touched weight file is read
    again, and new content gives a new fingerprint (issue 29, item 10)."""
    import os

    import pipeline.hashing
    from pipeline.models.loading import fingerprinted_model

    monkeypatch.setattr(pipeline.hashing, "HASH_CACHE_DIR", tmp_path / "hashes")
    monkeypatch.setattr(
        pipeline.hashing, "RACY_SECONDS", -60.0
    )  # files changed a moment ago count as settled
    model_dir = _settled_copy(tiny_model_dir, tmp_path / "model")
    reads = []
    original = pipeline.hashing.files_sha256_each
    monkeypatch.setattr(
        pipeline.hashing, "files_sha256_each", lambda paths, **kw: reads.append(1) or original(paths, **kw)
    )
    first = fingerprinted_model(model_dir)
    assert first == fingerprinted_model(model_dir) and len(reads) == 1  # the second read nothing
    weights = sorted(model_dir.glob("*.safetensors"))[0]
    os.utime(weights)  # touched: read again, the same content and fingerprint
    assert fingerprinted_model(model_dir) == first and len(reads) == 2
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF  # the same size, another byte
    weights.write_bytes(bytes(content))
    os.utime(weights, (0, os.stat(weights).st_mtime))  # even with the old mtime put back
    changed = fingerprinted_model(model_dir)
    assert changed[0] != first[0] and changed[1]["weights"] != first[1]["weights"]
    assert len(reads) == 3


def test_a_fresh_file_s_hash_is_not_kept(tiny_model_dir, tmp_path, monkeypatch):
    """A file written a moment ago may change again within its timestamps' granularity: hashed every time."""
    import shutil

    import pipeline.hashing
    from pipeline.models.loading import fingerprinted_model

    monkeypatch.setattr(pipeline.hashing, "HASH_CACHE_DIR", tmp_path / "hashes")
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir, copy_function=shutil.copy)  # written now
    reads = []
    original = pipeline.hashing.files_sha256_each
    monkeypatch.setattr(
        pipeline.hashing, "files_sha256_each", lambda paths, **kw: reads.append(1) or original(paths, **kw)
    )
    assert fingerprinted_model(model_dir) == fingerprinted_model(model_dir) and len(reads) == 2


def test_an_accelerator_load_places_the_weights_on_it(tiny_model_dir, monkeypatch):
    """On a GPU, from_pretrained gets the device (weights never sit in host RAM); on the CPU, nothing."""
    from transformers import AutoModelForImageTextToText

    calls = []
    original = AutoModelForImageTextToText.from_pretrained

    def recording(path, **kwargs):
        calls.append(kwargs)
        return original(path, **{key: value for key, value in kwargs.items() if key != "device_map"})

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", recording)
    load_model(str(tiny_model_dir), device="cuda:1")
    assert calls[-1]["device_map"] == {"": "cuda:1"}
    load_model(str(tiny_model_dir), device="cpu")
    assert "device_map" not in calls[-1]

"""Batched greedy generation, returning only the new text of each sample."""

from __future__ import annotations

import torch

from pipeline.journal import Journal
from pipeline.models.batching import _encode_model_inputs
from pipeline.models.family import PromptedSample
from pipeline.models.loading import LoadedModel


@torch.inference_mode()
def generate(
    loaded: LoadedModel,
    samples: list[PromptedSample],
    max_new_tokens: int = 50,
    batch_size: int = 8,
    progress: bool = False,
    description: str = "generate",
    model: torch.nn.Module | None = None,
    journal: Journal | None = None,
    shard: tuple[int, int] | None = None,
) -> list[str | None]:
    """Greedy decoding; returns only the newly generated text of each sample.

    With a journal, each batch's replies are recorded as it finishes and batches already recorded are not
    generated again: a resumed run forms the same batches, so it gives the same replies. With shard =
    (i, n), only every n-th batch from the i-th is generated (the others' replies are None): n processes
    share the work, batches of every prompt length going to each.
    """
    from tqdm.auto import tqdm

    model = model if model is not None else loaded.model
    device = next(model.parameters()).device
    replies: list[str | None] = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc=description, disable=not progress, unit="batch"):
        unit = f"{start}:{batch_size}"
        if shard is not None and (start // batch_size) % shard[1] != shard[0]:
            replies.extend([None] * len(samples[start : start + batch_size]))
            continue
        if journal is not None and unit in journal.done:
            replies.extend(journal.done[unit])
            continue
        chunk = samples[start : start + batch_size]
        images = [image for sample in chunk for image in sample.images]
        inputs = _encode_model_inputs(loaded, [s.prompt for s in chunk], images, [[] for _ in chunk])
        inputs.pop("position_ids", None)  # generate derives positions from the attention mask
        inputs = {name: value.to(device) for name, value in inputs.items()}
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
            eos_token_id=loaded.family.end_token_ids(loaded.tokenizer),
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = loaded.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if journal is not None:
            journal.record(unit, texts)
        replies.extend(texts)
    return replies

"""Key tokens over a teacher cache (ViKeR Def. 2, pipeline/unlearning/key_tokens.py) and `pipeline key-tokens`."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from pipeline.unlearning.key_tokens import key_tokens
from stages.cli import main


def test_key_tokens_follow_the_cached_entropy(tmp_path, tiny_model):
    from cache import CachedSample, ShardWriter, truncate_top_p
    from pipeline.models import answer_token_ids

    answer_ids = torch.tensor(answer_token_ids(tiny_model, "Mara Holt was born in Copenhagen"))
    vocab = len(tiny_model.tokenizer)
    logits = torch.zeros(len(answer_ids), vocab)
    logits[torch.arange(len(answer_ids)), answer_ids] = 30.0  # confident: entropy ~ 0 (normal tokens)
    logits[1] = 0.0  # uniform: entropy log(V) (a key token)
    truncated = truncate_top_p(logits.double(), 0.99, 64)
    sample = CachedSample.from_distributions("forget/0", answer_ids, truncated, torch.zeros(len(answer_ids)))
    header = {
        "teacher": "viker",
        "teacher_params": {},
        "top_p": 0.99,
        "max_support": 64,
        "prompt_template": "",
        "model_fingerprint": tiny_model.model_fingerprint,
        "tokenizer_fingerprint": tiny_model.tokenizer_fingerprint,
        "dataset_fingerprint": "x",
        "vocab_size": vocab,
    }
    with ShardWriter(tmp_path / "cache", 0, 1, header) as writer:
        writer.write(sample, {"prompt": "", "image_sources": [], "perturbation_seeds": []})
    [entry] = list(key_tokens(tmp_path / "cache", epsilon=1.0, tokenizer=tiny_model.tokenizer))
    assert entry.key == [index == 1 for index in range(len(answer_ids))]
    assert entry.entropy[1] == pytest.approx(float(torch.log(torch.tensor(float(vocab)))), rel=1e-3)
    assert "".join(entry.tokens).strip().startswith("Mara")

    result = CliRunner().invoke(main, ["key-tokens", str(tmp_path / "cache"), "--epsilon", "1.0"])
    assert result.exit_code == 0 and result.output.count("KEY") == 1

"""Key tokens over a teacher cache (ViKeR Def. 2): answer token y_i is key when the entropy of its ideal
post-unlearning distribution R_i (the full model's distribution averaged over irrelevant reference images,
Eq. 4) is at least epsilon; the cache stores H(R_i) per token. `pipeline key-tokens` lists them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class KeyTokens:
    sample_id: str
    tokens: list[str]
    entropy: list[float]
    key: list[bool]


def key_tokens(
    cache_dir: str | Path, epsilon: float, tokenizer=None, limit: int | None = None
) -> Iterator[KeyTokens]:
    """ViKeR Definition 2 over a teacher cache: y_i is key iff H(R_i) >= epsilon (the cache stores H)."""
    from cache import CacheError, iter_cache, read_manifest

    if tokenizer is not None:
        from pipeline.models import tokenizer_fingerprint

        if read_manifest(cache_dir).tokenizer_fingerprint != tokenizer_fingerprint(tokenizer):
            raise CacheError(
                f"cache {cache_dir} was made with another tokenizer than the one given to decode it"
            )
    for index, sample in enumerate(iter_cache(cache_dir, draw=0)):
        if limit is not None and index >= limit:
            break
        ids = sample.answer_token_ids.tolist()
        tokens = (
            [tokenizer.decode([token]) for token in ids] if tokenizer is not None else [str(t) for t in ids]
        )
        entropy = sample.entropy.tolist()
        yield KeyTokens(sample.sample_id, tokens, entropy, [h >= epsilon for h in entropy])


def format_key_tokens(entry: KeyTokens) -> str:
    """`sample_id: token [KEY 1.73] token ...` — key tokens marked with their entropy in nats."""
    parts = [
        f"[{token!r} KEY {h:.2f}]" if is_key else f"{token!r}"
        for token, h, is_key in zip(entry.tokens, entry.entropy, entry.key, strict=True)
    ]
    return f"{entry.sample_id}: " + " ".join(parts)

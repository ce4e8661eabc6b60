"""Which truncation rule bounds the tail-bucket KL error of every teacher? (issue: cache goals, item 11)

For the first 48 forget samples of the mini world, R is each teacher's full distribution and Q0 the
frozen model on the student's (unmodified) input, i.e. the student at step 0. Truncating R to its
top-k support S and a tail bucket gives KL_cached = sum_S r log(r/q) + eps log(eps/Q0(T)); its error is
exactly eps * KL(r_T/eps || q_T/Q0(T)) >= 0, the mismatch of the two tails' shapes, and it only falls
as k grows (grouping cells never raises a KL). Compared, per teacher: top-p alone (the default), and
"top-p p0 or more, until the error against Q0 is <= delta" for several p0, delta and caps. Writes
bench/results/truncation_rules.json; run after `dvc repro -s prepare`.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cache.distributions import tail_bucket_errors  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.unlearning.extractor import TeacherExtractor  # noqa: E402
from pipeline.unlearning.teachers import original, resolve_teacher  # noqa: E402
from stages.config import PrecomputeConfig  # noqa: E402
from stages.precompute import checked, load_samples, teacher_context  # noqa: E402


def errors_by_prefix(r: torch.Tensor, q: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, width) the tail-bucket error and the kept mass when S is the k most probable tokens of R."""
    top_r, order = torch.topk(r, width, dim=-1)
    return tail_bucket_errors(r, q, order), torch.cumsum(top_r, -1)


def rule(err: torch.Tensor, kept: torch.Tensor, top_p: float, delta: float | None, cap: int) -> dict:
    rows = torch.arange(len(err))
    k = ((kept[:, :cap] < top_p).sum(-1) + 1).clamp(max=cap)
    if delta is not None:
        ok = err[:, :cap] <= delta
        k = torch.maximum(k, torch.where(ok.any(-1), ok.float().argmax(-1) + 1, torch.full_like(k, cap)))
    chosen = err[rows, k - 1]
    return {
        "mean_support": float(k.float().mean()),
        "mean_error": float(chosen.mean()),
        "worst_error": float(chosen.max()),
        "tokens_above_1e-3": int((chosen > 1e-3).sum()),
    }


def main() -> None:
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine()}
    for name in ("viker", "vgid"):
        config = PrecomputeConfig(model="work/mini/model", data="work/mini/data", out="unused", teacher=name)
        entry = resolve_teacher(config.teacher, {}, config.args)
        config, teacher = checked(config, entry)
        loaded = load_model(config.model, **config.loading())
        samples = load_samples(config)[:48]
        context = teacher_context(config, entry, loaded)
        extractor = TeacherExtractor(loaded, config.top_p, config.max_support)
        with torch.inference_mode():
            _, r, _, _ = extractor.mean_distributions(samples, [teacher(s, context) for s in samples])
            _, q, _, _ = extractor.mean_distributions(samples, [original(s, context) for s in samples])
        r, q = r.double(), q.double()
        vocab = r.shape[-1]
        err, kept = errors_by_prefix(r, q, vocab)
        entry = {"tokens": len(r), "vocab": vocab}
        entry["top_p 0.995, cap 256 (the former default)"] = rule(err, kept, 0.995, None, 256)
        for delta in (1e-4, 1e-3):
            for cap in (256, 1024, vocab):
                entry[f"top_p 0.9 or until error <= {delta:g}, cap {cap}"] = rule(err, kept, 0.9, delta, cap)
        results[name] = entry
        print(name, json.dumps(entry, indent=1), flush=True)
    out = ROOT / "bench" / "results" / "truncation_rules.json"
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

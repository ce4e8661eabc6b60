"""The report stage: the papers' table over seeds, the figures, per-token probabilities and key tokens."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from pipeline.benchmarks import layout
from stages.cli import main
from stages.config import ReportConfig
from stages.report import (
    findings,
    key_tokens,
    load_runs,
    method_of,
    reference_entropy,
    report_markdown,
    run,
    summarize,
    token_probabilities,
    token_probability_plot,
    tradeoff_plot,
)

FIXTURE = Path(__file__).parent / "fixtures" / "mllmu_bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(root: Path, name: str, forget_mc: float, retain_rouge: float, protocol: str = "fixed") -> None:
    directory = root / name
    directory.mkdir(parents=True)
    metrics = {
        "forget": {"mc_acc": forget_mc, "rougeL": 0.9 - forget_mc / 2, "coherence": 0.9},
        "test": {"mc_acc": forget_mc + 0.05},
        "retain": {"mc_acc": 0.95, "rougeL": retain_rouge, "coherence": 0.92},
        "real": {"rougeL": 0.5},
        "forget_reverse": {"mc_acc": forget_mc + 0.1},
        "meta": {"protocol": protocol, "coherence_scorer": "ngram-fluency"},
    }
    (directory / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture()
def runs_dir(tmp_path) -> Path:
    root = tmp_path / "results"
    write_run(root, "full", 1.0, 0.95)
    write_run(root, "ga", 0.25, 0.2)
    for seed, (mc, rouge) in enumerate([(0.3, 0.8), (0.4, 0.84), (0.2, 0.82)], start=1):
        write_run(root, f"viker-s{seed}", mc, rouge)
    return root


def test_run_names_group_seeds_into_methods():
    assert method_of("viker-s2") == "viker"
    assert method_of("viker_no_ga-s10") == "viker_no_ga"
    assert method_of("full") == "full"
    assert method_of("ga_diff") == "ga_diff"


def test_summary_is_mean_and_sample_std_over_seeds(runs_dir):
    summary = summarize(load_runs(runs_dir))
    mean, std, count = summary["viker"]["retain"]["rougeL"]
    assert count == 3
    assert mean == pytest.approx(statistics.fmean([0.8, 0.84, 0.82]))
    assert std == pytest.approx(0.02)  # sample standard deviation of 0.80, 0.84, 0.82
    assert summary["full"]["forget"]["mc_acc"] == (1.0, None, 1)


def test_markdown_table_in_the_papers_layout(runs_dir):
    text = report_markdown(load_runs(runs_dir))
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| Method"))
    assert (
        header.index("Forget ACC")
        < header.index("Generalization ACC")
        < header.index("Retain ACC")
        < header.index("Real ROUGE-L")
    )
    rows = [
        line
        for line in lines
        if line.startswith("| Full") or line.startswith("| GA") or line.startswith("| ViKeR")
    ]
    assert [row.split("|")[1].strip() for row in rows[:3]] == ["Full", "GA", "ViKeR"]  # the papers' row order
    viker = rows[2]
    assert "30.0±10.0" in viker  # forget ACC: mean 0.3, std 0.1 over three seeds, in %
    assert "| 100.0 |" in rows[0]  # one run: no ±
    assert "Coherence (GIB) scorer: ngram-fluency" in text
    assert "Reverse-engineering attack" in text and "Warning" not in text


def _summary(values: dict[str, dict[str, dict[str, float]]]):
    return {method: {split: {metric: (value, None, 1) for metric, value in metrics.items()}
                     for split, metrics in splits.items()} for method, splits in values.items()}  # fmt: skip


def _paper_like() -> dict[str, dict[str, dict[str, float]]]:
    def run(forget_mc, forget_rouge, retain_rouge, coherence):
        return {"forget": {"mc_acc": forget_mc, "rougeL": forget_rouge},
                "retain": {"rougeL": retain_rouge, "coherence": coherence}}  # fmt: skip

    return {
        "full": run(1.0, 1.0, 1.0, 1.0), "ga": run(0.1, 0.0, 0.2, 0.3), "npo": run(0.3, 0.2, 0.5, 0.6),
        "viker": run(0.3, 0.5, 0.9, 0.95), "vgid": run(0.8, 0.6, 0.95, 1.0),
        "viker_no_ga": run(0.8, 0.9, 1.0, 1.0), "viker_no_vis": run(0.3, 0.3, 0.6, 0.7),
    }  # fmt: skip


def test_findings_check_each_claim_on_the_means():
    checked = findings(_summary(_paper_like()))
    assert len(checked) == 9 and all(holds for _, holds, _ in checked)
    # Each claim fails when its numbers say otherwise, and only the claims that read them.
    for method, split, metric, value, failing in [
        ("full", "forget", "mc_acc", 0.8, ["The full model"]),
        ("ga", "retain", "coherence", 0.9, ["GA destroys"]),
        ("viker", "forget", "mc_acc", 0.42, ["ViKeR forgets"]),
        # Far from chance, ViKeR's forgetting no longer compares with GA's (0.1) or NPO's (0.3).
        ("viker", "forget", "mc_acc", 0.7, ["ViKeR forgets", "ViKeR beats GA", "ViKeR beats NPO"]),
        ("viker", "retain", "rougeL", 0.75, ["ViKeR keeps"]),
        ("npo", "retain", "rougeL", 0.95, ["ViKeR beats NPO"]),
        ("vgid", "forget", "rougeL", 0.8, ["Vgid"]),
        ("vgid", "retain", "rougeL", 0.9, ["Vgid"]),
        ("viker_no_ga", "forget", "mc_acc", 0.2, ["ViKeR w/o GA"]),
        ("viker_no_vis", "retain", "rougeL", 0.95, ["ViKeR w/o Vis"]),
    ]:
        values = _paper_like()
        values[method][split][metric] = value
        failed = [claim for claim, holds, _ in findings(_summary(values)) if not holds]
        assert len(failed) == len(failing), (method, metric, failed)
        assert all(claim.startswith(start) for claim, start in zip(failed, failing, strict=True)), failed
    # A claim whose runs were not evaluated is left out, not failed.
    partial = {name: runs for name, runs in _paper_like().items() if name in ("full", "viker")}
    assert [claim for claim, _, _ in findings(_summary(partial))] == [
        "The full model remembers: forget MC ≥ 0.9, forget ROUGE-L ≥ 0.8",
        "ViKeR forgets: forget MC within 0.15 of chance (0.25)",
        "ViKeR keeps: retain ROUGE-L ≥ 0.8 × and GIB ≥ 0.9 × the full model's",
    ]


def test_report_warns_when_runs_were_scored_differently(runs_dir):
    write_run(runs_dir, "npo", 0.3, 0.6, protocol="official")
    assert "do not compare" in report_markdown(load_runs(runs_dir))


def test_bad_runs_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no <run>/metrics.json"):
        load_runs(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken/metrics.json"):
        load_runs(tmp_path)


def test_stage_writes_report_and_tradeoff_plot(runs_dir, tmp_path):
    out = run(ReportConfig(runs=str(runs_dir), out=str(tmp_path / "out" / "report.md"), token_plot=False))
    assert "![tradeoff](tradeoff.png)" in out.read_text()
    assert (tmp_path / "out" / "tradeoff.png").read_bytes()[:8] == PNG_MAGIC


def test_tradeoff_plot_needs_forget_and_retain(tmp_path):
    write_run(tmp_path / "r", "only", 0.5, 0.5)
    assert tradeoff_plot(load_runs(tmp_path / "r"), tmp_path / "t.png").exists()


# ------------------------------------------------------------------------------ model-based figures


def dense_answer_distributions(loaded, prompt: str, image, answer: str) -> torch.Tensor:
    """Reference: a plain forward pass over prompt + answer, softmax at the positions before each answer token."""
    from pipeline.models import answer_token_ids

    encoded = loaded.family.encode_prompts(loaded.processor, [prompt], [image] if image is not None else [])
    ids = encoded.pop("input_ids")[0]
    answer_ids = answer_token_ids(loaded, answer)
    input_ids = torch.tensor([ids + answer_ids])
    with torch.no_grad():
        logits = loaded.model(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **encoded
        ).logits[0]
    return logits[len(ids) - 1 : len(ids) - 1 + len(answer_ids)].softmax(-1)


def test_reference_entropy_is_entropy_of_the_averaged_distribution(tiny_model):
    from PIL import Image

    prompt = tiny_model.family.build_prompt("What is the name of this person?", True)
    answer = "Mara Holt"
    images = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    averaged = torch.stack(
        [dense_answer_distributions(tiny_model, prompt, image, answer) for image in images]
    ).mean(0)
    expected = -(averaged * averaged.log()).sum(-1)
    assert reference_entropy(tiny_model, prompt, answer, images, batch_size=2) == pytest.approx(
        expected.tolist(), rel=1e-4
    )


def test_token_probabilities_before_and_after_an_adapter(tiny_model_dir, tmp_path):
    from PIL import Image
    from test_evaluate import save_adapter  # tests/ is on sys.path under pytest's default import mode

    adapter = save_adapter(tiny_model_dir, tmp_path / "adapter", scale=0.5)
    references = [Image.new("RGB", (32, 32), (40 * i, 100, 200 - 40 * i)) for i in range(3)]
    table = token_probabilities(
        str(tiny_model_dir), {"GA": str(adapter)}, layout("mllmu", FIXTURE), "forget_5", references
    )
    assert set(table.probabilities) == {"Full", "GA"}
    assert len(table.tokens) == len(table.entropy) == len(table.probabilities["Full"])
    assert table.probabilities["Full"] != table.probabilities["GA"]  # the adapter changed the model
    assert all(0.0 <= p <= 1.0 for p in table.probabilities["GA"])
    figure = token_probability_plot(table, tmp_path / "tokens.png", epsilon=0.5)
    assert figure.read_bytes()[:8] == PNG_MAGIC


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

    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["key-tokens", str(tmp_path / "cache"), "--epsilon", "1.0"])
    assert result.exit_code == 0 and result.output.count("KEY") == 1

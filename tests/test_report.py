"""The report stage (stages/report.py, pipeline/reporting): runs grouped over seeds, each paper's own table
first and the full tables in an appendix, the figures from the runs' files, and no model loaded."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from project_imports import REPO, code_of, module_files

from pipeline.reporting.figures import (
    method_style,
    token_probabilities_of_runs,
    token_probability_plot,
    tradeoff_plot,
)
from pipeline.reporting.markdown import report_markdown
from pipeline.reporting.runs import load_runs, method_of, summarize
from stages.config import ReportConfig
from stages.report import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVERY_MEASURE = ("mc_acc", "cloze_acc", "rougeL", "bleu", "coherence", "rec")


def write_run(
    root: Path,
    name: str,
    forget_mc: float,
    retain_rouge: float,
    protocol: str = "fixed",
    mc_scoring: str | None = "generate",
) -> None:
    directory = root / name
    directory.mkdir(parents=True)
    metrics = {
        "forget": {"mc_acc": forget_mc, "rougeL": 0.9 - forget_mc / 2, "coherence": 0.9},
        "test": {"mc_acc": forget_mc + 0.05},
        "retain": {"mc_acc": 0.95, "rougeL": retain_rouge, "coherence": 0.92},
        "real": {"rougeL": 0.5},
        "forget_reverse": {"mc_acc": forget_mc + 0.1},
        "meta": {"protocol": protocol, "coherence_scorer": "ngram-fluency", "mc_scoring": mc_scoring},
    }
    if mc_scoring is None:  # a run from before metrics.json recorded it
        del metrics["meta"]["mc_scoring"]
    (directory / "metrics.json").write_text(json.dumps(metrics))


def write_token_probs(
    directory: Path, probabilities: list[float], entropy=None, sample_id="forget/0"
) -> None:
    entry = {"sample_id": sample_id, "question": "Who is this?", "answer": "Mara Holt",
             "tokens": ["Mara", " Holt"], "entropy": entropy, "probabilities": probabilities}  # fmt: skip
    (directory / "token_probs.json").write_text(json.dumps(entry))


@pytest.fixture()
def runs_dir(tmp_path) -> Path:
    root = tmp_path / "results"
    write_run(root, "full", 1.0, 0.95)
    write_run(root, "ga", 0.25, 0.2)
    for seed, (mc, rouge) in enumerate([(0.3, 0.8), (0.4, 0.84), (0.2, 0.82)], start=1):
        write_run(root, f"viker-s{seed}", mc, rouge)
    return root


def _header_of(text: str, title: str) -> str:
    """The header row of the table under the section titled `title`."""
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("#") and title in line)
    return next(line for line in lines[start:] if line.startswith("| Method"))


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


def test_report_leads_with_the_papers_tables_then_the_findings_and_an_appendix(runs_dir):
    text = report_markdown(load_runs(runs_dir))
    sections = ["(ViKeR Table 1)", "(Vgid Table 3)", "## The papers' findings", "## Appendix",
                "### Image + text questions", "### Reverse-engineering attack"]  # fmt: skip
    assert [text.index(section) for section in sections] == sorted(text.index(s) for s in sections)
    # Only the paper's columns these runs have, in the paper's order.
    assert _header_of(text, "(ViKeR Table 1)") == (
        "| Method | Forget Acc | Forget Gib↑ | Generalization Acc | Retain Rouge↑ | Retain Gib↑ | Real Rouge↑ |"
    )
    assert _header_of(text, "(Vgid Table 3)") == (
        "| Method | Forget Class.Acc ↓ | Forget Gen.RL ↓ | Test Class.Acc ↓ | Retain Class.Acc ↑ | Retain Gen.RL ↑ |"
    )
    appendix = _header_of(text, "### Image + text questions")
    assert (
        appendix.index("Forget ACC")
        < appendix.index("Generalization ACC")
        < appendix.index("Retain ACC")
        < appendix.index("Real ROUGE-L")
    )
    rows = [line for line in text.splitlines() if line.startswith(("| Full", "| GA", "| ViKeR"))]
    assert [row.split("|")[1].strip() for row in rows[:3]] == ["Full", "GA", "ViKeR"]  # the papers' row order
    assert (
        rows[2].split("|")[2].strip() == "30.0±10.0"
    )  # forget Acc: mean 0.3, std 0.1 over three seeds, in %
    assert "| 100.0 |" in rows[0]  # one run: no ±
    assert "Coherence (GIB) scorer: ngram-fluency" in text and "Warning" not in text
    assert "Text-only questions" not in text  # the runs have no text_ measure: no empty table
    assert "judged on the means over seeds)" in text and "Intervals and verdicts" not in text  # no responses
    # Claims on runs that are missing are listed, not dropped.
    assert (
        "- not checked: ViKeR w/o GA forgets less: higher forget MC than ViKeR (run viker_no_ga missing)"
        in text
    )


def test_the_paper_tables_have_the_papers_columns(tmp_path):
    """With every measure on every split, each paper table shows exactly its paper's columns."""
    directory = tmp_path / "runs" / "viker-s0"
    directory.mkdir(parents=True)
    metrics = {split: dict.fromkeys(EVERY_MEASURE, 0.5) for split in ("forget", "test", "retain", "real")}
    (directory / "metrics.json").write_text(json.dumps(metrics))
    text = report_markdown(load_runs(tmp_path / "runs"))
    viker = [name.strip() for name in _header_of(text, "(ViKeR Table 1)").strip("|").split("|")][1:]
    assert viker == [  # ViKeR Table 1: Forget (Acc, Gib), Generalization (Acc, Gib), Retain and Real (Rouge, BLEU, Gib)
        "Forget Acc", "Forget Gib↑", "Generalization Acc", "Generalization Gib↑", "Retain Rouge↑",
        "Retain BLEU↑", "Retain Gib↑", "Real Rouge↑", "Real BLEU↑", "Real Gib↑",
    ]  # fmt: skip
    vgid = [name.strip() for name in _header_of(text, "(Vgid Table 3)").strip("|").split("|")][1:]
    assert vgid == [  # Vgid Table 3: Forget, Test and Retain Set by Cloze.Acc, Class.Acc and Gen.RL
        f"{split} {measure} {arrow}"
        for split, arrow in (("Forget", "↓"), ("Test", "↓"), ("Retain", "↑"))
        for measure in ("Cloze.Acc", "Class.Acc", "Gen.RL")
    ]


def test_clear_runs_get_viker_table_2_and_no_mllmu_findings(tmp_path):
    directory = tmp_path / "runs" / "viker-s0"
    directory.mkdir(parents=True)
    metrics = {"forget": {"rec": 0.1, "coherence": 0.9}, "retain": {"rec": 0.8, "coherence": 0.9},
               "real_faces": {"mc_acc": 0.7}, "real_world": {"mc_acc": 0.5}}  # fmt: skip
    (directory / "metrics.json").write_text(json.dumps(metrics))
    text = report_markdown(load_runs(tmp_path / "runs"))
    assert _header_of(text, "(ViKeR Table 2)") == (
        "| Method | Forget Rec | Forget Gib | Retain Rec | Retain Gib | Real QA Acc (Aut) | Real QA Acc (Wor) |"
    )
    assert "ViKeR Table 1" not in text and "findings" not in text
    assert "Real faces ACC" in _header_of(text, "### Image + text questions")


def test_report_warns_when_runs_were_scored_differently(runs_dir):
    write_run(runs_dir, "npo", 0.3, 0.6, protocol="official")
    assert "do not compare" in report_markdown(load_runs(runs_dir))


def test_the_header_names_the_multiple_choice_scoring_the_runs_recorded(tmp_path):
    root = tmp_path / "results"
    for name in ("full", "ga"):
        write_run(root, name, 0.5, 0.5, protocol="official", mc_scoring="likelihood")
    text = report_markdown(load_runs(root))
    assert "Evaluation protocol: official. Multiple choice scored by: likelihood " in text
    assert "do not compare" not in text
    write_run(root, "npo", 0.3, 0.6, protocol="official", mc_scoring=None)
    text = report_markdown(load_runs(root))
    assert "Multiple choice scored by: likelihood, not recorded " in text and "do not compare" in text


def test_bad_runs_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no <run>/metrics.json"):
        load_runs(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken/metrics.json"):
        load_runs(tmp_path)


def test_stage_writes_report_and_tradeoff_plot(runs_dir, tmp_path):
    out = run(ReportConfig(runs=str(runs_dir), out=str(tmp_path / "out" / "report.md")))
    assert "![tradeoff](tradeoff.png)" in out.read_text()
    assert (tmp_path / "out" / "tradeoff.png").read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "out" / "token_probs.png").exists()  # no run has token_probs.json: no plot


def test_tradeoff_plot_needs_forget_and_retain(tmp_path):
    write_run(tmp_path / "r", "only", 0.5, 0.5)
    assert tradeoff_plot(load_runs(tmp_path / "r"), tmp_path / "t.png").exists()


def test_every_method_of_the_tradeoff_plot_looks_different():
    assert len({method_style(index) for index in range(70)}) == 70


def test_token_plot_comes_from_the_runs_token_probs_files(runs_dir, tmp_path):
    write_token_probs(runs_dir / "full", [0.9, 0.8])
    write_token_probs(runs_dir / "ga", [0.1, 0.2], entropy=[0.2, 1.5])
    write_token_probs(runs_dir / "viker-s2", [0.4, 0.3])
    write_token_probs(runs_dir / "viker-s1", [0.5, 0.6], entropy=[0.1, 1.2])
    table = token_probabilities_of_runs(load_runs(runs_dir))
    assert table.probabilities == {
        "Full": [0.9, 0.8],
        "GA": [0.1, 0.2],
        "ViKeR": [0.5, 0.6],
    }  # ViKeR: first seed
    assert table.entropy == [0.2, 1.5] and table.tokens == ["Mara", " Holt"]
    assert token_probability_plot(table, tmp_path / "tokens.png", epsilon=1.0).read_bytes()[:8] == PNG_MAGIC
    write_token_probs(runs_dir / "ga", [0.1, 0.2], sample_id="forget/3")
    with pytest.raises(ValueError, match="same token-plot sample"):
        token_probabilities_of_runs(load_runs(runs_dir))


def test_the_report_loads_no_model(runs_dir, tmp_path):
    """Neither the stage's code nor a run of it (token plot included) imports torch or pipeline.models."""
    code = code_of(module_files("stages.report"))
    assert not [path for path in code if path.startswith(("pipeline/models", "cache/"))], sorted(code)
    write_token_probs(runs_dir / "full", [0.9, 0.8], entropy=[0.1, 1.2])
    write_token_probs(runs_dir / "ga", [0.1, 0.2])
    script = (
        "import sys\nfrom stages.config import ReportConfig\nfrom stages.report import run\n"
        f"run(ReportConfig(runs={str(runs_dir)!r}, out={str(tmp_path / 'out' / 'report.md')!r}))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('pipeline.models')))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "out" / "token_probs.png").read_bytes()[:8] == PNG_MAGIC
    assert "![token_probs](token_probs.png)" in (tmp_path / "out" / "report.md").read_text()


def test_the_origin_run_is_the_first_row_before_full_as_in_the_papers_tables(runs_dir):
    """evaluate-origin@<entry> writes results/runs/origin: the released checkpoint before the finetune stage."""
    write_run(runs_dir, "origin", 0.25, 0.3)
    text = report_markdown(load_runs(runs_dir))
    table = text[text.index("(ViKeR Table 1)") :]
    assert table.index("| Origin |") < table.index("| Full |") < table.index("| ViKeR |")

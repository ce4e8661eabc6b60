"""A real experiment through `dvc repro`, selected the way the README tells a researcher to: a tiny random
LLaVA on MLLMU-Bench's fixture files and a tiny random Qwen2-VL on CLEAR's, each through precompute, train,
the relearning attack, evaluate and report; then switching back without recomputing, and a lambda sweep
with `dvc exp run` from the same caches."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import build_random_tiny_llava, build_random_tiny_qwen2_vl
from test_dvc import _dvc, _run

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SPLIT_FILE = "train-00000-of-00001.parquet"
METHODS = ("ga", "viker")


def move_rows(root: Path, source: str, target: str, chosen) -> None:
    """Rows of split folder `source` for which chosen(row) holds are moved to the end of `target`'s."""
    rows = {name: pq.read_table(root / name / SPLIT_FILE).to_pylist() for name in (source, target)}
    moved = [row for row in rows[source] if chosen(row)]
    kept = [row for row in rows[source] if not chosen(row)]
    pq.write_table(pa.Table.from_pylist(kept), root / source / SPLIT_FILE)
    pq.write_table(pa.Table.from_pylist(rows[target] + moved), root / target / SPLIT_FILE)


def build_inputs(root: Path) -> None:
    """work/tiny: both tiny models, the fixtures with a second forget person (the relearning attack needs
    one relearned on and one held out), and a people reference pool."""
    tiny = root / "work" / "tiny"
    build_random_tiny_llava(tiny / "llava")
    build_random_tiny_qwen2_vl(tiny / "qwen2vl")
    for source, target in (("mllmu_bench", "mllmu/eval"), ("mllmu_train", "mllmu/train")):
        shutil.copytree(FIXTURES / source, tiny / target)
        move_rows(tiny / target, "retain_95", "forget_5", lambda row: row["ID"] == "002")
    shutil.copytree(FIXTURES / "clear", tiny / "clear")
    move_rows(tiny / "clear", "retain95", "forget05", lambda row: row["name"] == "Ivo Brenner")
    from PIL import Image

    (tiny / "references" / "people").mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (32, 32), (60 * index, 90, 200 - 60 * index)).save(
            tiny / "references/people" / f"{index}.png"
        )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project's tracked files, the test experiments beside the shipped ones, and the tiny inputs."""
    root = tmp_path_factory.mktemp("experiment") / "project"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    for path in (FIXTURES / "experiments").glob("*.yaml"):
        shutil.copy(path, root / "experiments" / path.name)
    build_inputs(root)
    (root / ".gitignore").write_text("/work\n")
    _run(["git", "init", "-q"], root)
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "project"], root)
    return root


def select_and_run(project: Path, name: str) -> str:
    """The README's two commands: select the experiment, reproduce its report."""
    _run([sys.executable, "-m", "stages", "experiment", "use", name], project)
    return _dvc("repro", "report", cwd=project).stdout


def check_runs(project: Path, roles: tuple[str, ...], measure: str) -> dict:
    for run in ["full"] + [f"{method}-s{seed}" for method in METHODS for seed in range(3)]:
        metrics = json.loads((project / "results/runs" / run / "metrics.json").read_text())
        for role in roles:
            assert 0.0 <= metrics[role][measure] <= 1.0, (run, role)
        assert metrics["forget_relearned"], run  # the relearning attack ran on every run
    return json.loads((project / "results/runs/full/meta.json").read_text())


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {
        name: tensor for path in model_dir.glob("*.safetensors") for name, tensor in load_file(path).items()
    }


def test_the_finetune_stage_makes_the_full_model_every_later_stage_loads(project):
    """finetune@full through `dvc repro`: the tiny random LLaVA (the origin) fine-tuned on the fixtures'
    people into work/finetuned/full, merged (no LoRA module), loadable, and upstream of precompute; the
    origin is evaluated as the report's Origin row."""
    import torch

    from pipeline.models import load_model

    _run([sys.executable, "-m", "stages", "experiment", "use", "tiny-llava-mllmu"], project)
    output = _dvc("repro", "finetune@full", cwd=project).stdout
    assert "Running stage 'finetune@full'" in output and "Running stage 'prepare'" not in output
    full, origin = weights(project / "work/finetuned/full"), weights(project / "work/tiny/llava")
    assert set(full) == set(origin) and not any("lora" in name for name in full)
    assert any(not torch.equal(full[name], origin[name]) for name in origin)
    load_model(str(project / "work/finetuned/full"))
    assert "finetune@full" in _dvc("dag", "precompute@viker-0", cwd=project).stdout
    assert "finetune@full" in _dvc("dag", "train@ga", cwd=project).stdout
    assert "evaluate-origin@full" in _dvc("dag", "report", cwd=project).stdout
    output = _dvc("repro", "evaluate-origin@full", cwd=project).stdout
    assert "Running stage 'finetune@full'" not in output  # the origin's evaluation needs no fine-tune
    metrics = json.loads((project / "results/runs/origin/metrics.json").read_text())
    assert 0.0 <= metrics["forget"]["rougeL"] <= 1.0
    _run([sys.executable, "-m", "stages", "experiment", "use", "tiny-qwen2vl-clear"], project)
    assert "finetune@" not in _dvc("stage", "list", cwd=project).stdout  # its full model is declared


@pytest.mark.slow
def test_tiny_llava_on_mllmu_bench_then_qwen2_vl_on_clear_then_back(project):
    output = select_and_run(project, "tiny-llava-mllmu")
    assert "prepare" not in output.split("Running stage")[1:]  # the mini world is not built for it
    meta = check_runs(project, ("forget", "test", "retain", "real"), "rougeL")
    assert meta["config"]["protocol"] == "official" and meta["model_family"] == "llava"
    assert meta["few_shot_profiles"] == {"classification": 1, "cloze": 2}  # eval.py at its head
    report = (project / "results/report.md").read_text()
    assert "ViKeR" in report and "Forget" in report
    assert report.index("| Origin |") < report.index(
        "| Full |"
    )  # the origin row first, as the papers' tables
    assert not (project / "work/mini").exists()
    diff = _dvc("params", "diff", cwd=project).stdout
    assert "model.model" in diff and "work/tiny/llava" in diff  # against the committed mini params

    output = select_and_run(project, "tiny-qwen2vl-clear")
    meta = check_runs(project, ("forget", "retain"), "rec")
    metrics = json.loads((project / "results/runs/viker-s0/metrics.json").read_text())
    assert set(metrics["real_faces"]) == {"mc_acc"} and set(metrics["real_world"]) == {"mc_acc"}
    assert meta["model_family"] == "qwen2_vl" and meta["split_names"]["retain"] == "retain95"
    report = (project / "results/report.md").read_text()
    assert "Rec" in report and "Acc (Aut)" in report  # ViKeR Table 2's layout

    output = select_and_run(project, "tiny-llava-mllmu")
    assert "Running stage 'train@viker'" not in output  # DVC's run cache restores, nothing recomputes
    assert "is cached - skipping run" in output


@pytest.mark.slow
def test_a_lambda_sweep_reuses_the_caches(project):
    select_and_run(project, "tiny-llava-mllmu")
    _run(["git", "add", "-A"], project)
    _run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "tiny-llava-mllmu"],
        project,
    )
    outputs = [
        _dvc("exp", "run", "report", "-S", f"methods.viker.args.lambda={value}", cwd=project).stdout
        for value in (0.5, 2.0)
    ]
    for output in outputs:
        assert "Running stage 'train@viker'" in output
        assert "Running stage 'precompute" not in output and "Running stage 'train@ga'" not in output
    shown = json.loads(_dvc("exp", "show", "--json", cwd=project).stdout)
    lambdas = {
        experiment["data"]["params"]["params.yaml"]["data"]["methods"]["viker"]["args"]["lambda"]
        for baseline in shown
        for experiment in [baseline, *[e for run in baseline.get("experiments") or [] for e in run["revs"]]]
        if experiment.get("data")
    }
    assert {0.05, 0.5, 2.0} <= lambdas

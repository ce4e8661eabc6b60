"""The DVC pipeline end to end on a reduced world, and the cluster recipe with two local "nodes".

This runs the real `dvc repro` (every stage of dvc.yaml, as `make repro` does) in a copy of the
repository with a params.yaml shrunk to a few people, one fine-tune epoch and few questions, so that
it fits CI; the full-size run is the README's main command, not a test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from project_imports import code_of, module_files

REPO = Path(__file__).resolve().parents[1]

SMALL_PARAMS = {
    "prepare-mini": {
        "num_people": 20,  # forget_10 holds 2: one relearned on, one held out (the relearning attack)
        "num_real": 3,
        "num_reference_people": 6,
        "alt_images": 1,
        "fact_epochs": 1,
        "epochs": 1,
        "batch_size": 16,
        "people_per_split": 2,
    },
    "precompute": {"batch_size": 4},
    "train": {"epochs": 1, "batch_size": 4},
    "relearn": {"epochs": 1},
    "evaluate": {"limit": 1, "max_new_tokens": 6, "batch_size": 16},
}


def _env() -> dict[str, str]:
    env = dict(
        os.environ,
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )
    return result


def _dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], cwd, check)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A copy of the project (its tracked files) with a shrunk params.yaml, after one full `dvc repro`."""
    root = tmp_path_factory.mktemp("dvc") / "project"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in SMALL_PARAMS.items():
        params[section].update(values)
    params["teachers"]["viker"]["args"]["k"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _dvc("repro", cwd=root)
    return root


# The CLI command of each dvc.yaml stage -> the module under stages/ it runs.
STAGE_MODULES = {
    "prepare-mini": "prepare",
    "finetune": "finetune",
    "precompute": "precompute",
    "train": "train",
    "relearn": "relearn",
    "evaluate": "evaluate",
    "report": "report",
}


def test_every_stage_depends_on_the_code_it_runs():
    """A change to any project file a stage imports reruns the stage: no output is left stale by a code change."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        command = re.search(r"pipeline ([\w-]+)", body["cmd"]).group(1)
        code = code_of(module_files(f"stages.{STAGE_MODULES[command]}"))
        covered = {path for path in code for dep in body["deps"] if path == dep or path.startswith(dep + "/")}
        missing = code - covered
        assert not missing, f"dvc.yaml stage {name} runs {sorted(missing)} but does not depend on them"
    assert any(
        "pipeline/unlearning/refusals.txt".startswith(dep) for dep in stages["train"]["do"]["deps"]
    )  # IdkPO's refusal sentences: data, not code


def dvc_stages(root: Path) -> dict:
    """name -> DVC's stage of the project's dvc.yaml, interpolated with its params.yaml (nothing runs)."""
    from dvc.repo import Repo

    with Repo(str(root)) as dvc_repo:
        return {stage.name: stage for stage in dvc_repo.index.stages}


def rerun_by_a_change_of(stages: dict, key: str) -> set[str]:
    """The stages `dvc repro` reruns when params.yaml's `key` changes: those that read it, and every stage
    that depends on what one of them writes, transitively."""

    def reads(stage) -> bool:
        params = [name for dep in stage.deps if hasattr(dep, "params") for name in dep.params]
        return any(key == name or key.startswith(name + ".") for name in params)

    def writes_into(upstream, stage) -> bool:
        outs = [str(out.def_path) for out in upstream.outs]
        deps = [str(dep.def_path) for dep in stage.deps if not hasattr(dep, "params")]
        return any(
            dep == out or out.startswith(dep + "/") or dep.startswith(out + "/")
            for dep in deps
            for out in outs
        )

    rerun = {name for name, stage in stages.items() if reads(stage)}
    while True:
        more = {
            name for name, stage in stages.items() if name not in rerun
            if any(writes_into(stages[upstream], stage) for upstream in rerun)
        }  # fmt: skip
        if not more:
            return rerun
        rerun |= more


def test_a_teachers_argument_reruns_only_its_precompute_and_what_reads_its_cache():
    """Vgid's sigma: precompute@vgid-* and the methods that read work/cache/vgid, never ViKeR's precompute."""
    stages = dvc_stages(REPO)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(params["teachers"]) == {"viker", "vgid", "original", "base"}
    assert {name for name in stages if name.startswith("precompute@")} == {
        f"precompute@{teacher}-{shard}" for teacher in params["teachers"] for shard in (0, 1)
    }
    readers = [name for name, entry in params["methods"].items() if entry["forget_teacher"] == "vgid"]
    assert readers == ["vgid"]
    expected = {"precompute@vgid-0", "precompute@vgid-1", "report"} | {
        f"{stage}@{method}" for stage in ("train", "relearn", "evaluate") for method in readers
    }
    assert rerun_by_a_change_of(stages, "teachers.vgid.args.sigma") == expected
    # A method depends only on the caches its teacher slots name.
    cache_deps = {
        name: {str(dep.def_path) for dep in stage.deps if str(dep.def_path).startswith("work/cache/")}
        for name, stage in stages.items()
        if name.startswith("train@")
    }
    assert cache_deps["train@viker"] == {"work/cache/viker", "work/cache/none"}
    assert cache_deps["train@ga"] == {"work/cache/none"} and (REPO / "work/cache/none").is_file()
    assert cache_deps["train@vgid"] == {"work/cache/vgid", "work/cache/base"}


@pytest.mark.slow
def test_repro_writes_every_stage_output(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    methods = list(params["methods"])
    full_model = json.loads((repo / "metrics/full_model.json").read_text())
    assert full_model["fine_tune"]["epochs"] == 2  # one fact epoch, one on every format
    assert (repo / "work/mini/model/model.safetensors").is_file()
    assert (repo / "work/mini/data/forget_10/train-00000-of-00001.parquet").is_file()
    for teacher in ("viker", "vgid", "original", "base"):
        _run([sys.executable, "-m", "stages", "cache", "verify", f"work/cache/{teacher}"], repo)
    runs = ["full"] + [f"{method}-s{seed}" for method in methods for seed in range(3)]
    for run in runs:
        metrics = json.loads((repo / "results" / "runs" / run / "metrics.json").read_text())
        for split in ("forget", "test", "retain", "real"):
            assert 0.0 <= metrics[split]["rougeL"] <= 1.0, (run, split)
            assert 0.0 <= metrics[split]["mc_acc"] <= 1.0, (run, split)
        # The relearning attack: the held-out forget people before and after it, on every run.
        assert (
            set(metrics["forget_heldout"]) == set(metrics["forget_relearned"]) and metrics["forget_relearned"]
        )
        if run != "full":
            assert (repo / "work/adapters" / run / "adapter_config.json").is_file()
            assert (repo / "work/relearned" / run / "adapter_config.json").is_file()
    report = (repo / "results/report.md").read_text()
    assert "ViKeR" in report and "Vgid" in report
    assert "The relearning attack and membership inference" in report
    assert (repo / "results/relearning.png").is_file()
    shown = json.loads(_dvc("metrics", "show", "--json", cwd=repo).stdout)
    assert any("results/runs/viker-s0/metrics.json" in json.dumps(entry) for entry in shown.values())


@pytest.mark.slow
def test_second_repro_is_up_to_date_and_lambda_reruns_only_training(repo):
    assert "up to date" in _dvc("status", cwd=repo).stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["methods"]["viker"]["args"]["lambda"] != 0.25  # λ really changes
    params["methods"]["viker"]["args"]["lambda"] = 0.25
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = _dvc("status", "--json", cwd=repo).stdout
    changed = set(json.loads(stale))
    assert "train@viker" in changed
    assert not any(stage.startswith(("precompute", "prepare")) for stage in changed)
    assert "train@viker_no_ga" not in changed


@pytest.mark.slow
def test_a_changed_sigma_makes_only_vgids_precompute_stale(repo):
    """dvc status on the built pipeline after Vgid's sigma changes: its two precompute stages only (what
    reads their outputs follows when they rerun: test_a_teachers_argument_reruns_only_...)."""
    params_path = repo / "params.yaml"
    before = params_path.read_text()
    stale_before = set(json.loads(_dvc("status", "--json", cwd=repo).stdout))  # e.g. an earlier test's lambda
    params = yaml.safe_load(before)
    params["teachers"]["vgid"]["args"]["sigma"] = 0.25
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = set(json.loads(_dvc("status", "--json", cwd=repo).stdout))
    finally:
        params_path.write_text(before)
    assert changed - stale_before == {"precompute@vgid-0", "precompute@vgid-1"}


@pytest.mark.slow
def test_cluster_recipe_two_nodes_one_shard_each(repo, tmp_path):
    """Two processes stand in for two nodes: each computes one precompute shard into shared storage, the
    outputs are committed with `dvc commit`, pushed to a DVC remote and pulled back after a loss."""
    before = {path.name: path.read_bytes() for path in (repo / "work/cache/viker").glob("shard-*")}
    shutil.rmtree(repo / "work/cache/viker")
    command = [
        sys.executable,
        "-m",
        "stages",
        "precompute",
        "--teacher",
        "viker",
        "--model",
        "work/mini/model",
        "--data",
        "work/mini/data",
        "--out",
        "work/cache/viker",
        "--num-shards",
        "2",
        "--no-progress",
    ]
    nodes = [
        subprocess.Popen(
            [*command, "--shard-index", str(index)],
            cwd=repo,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in (0, 1)
    ]
    for node in nodes:
        _, error = node.communicate()
        assert node.returncode == 0, error[-2000:]
    after = {path.name: path.read_bytes() for path in (repo / "work/cache/viker").glob("shard-*")}
    assert after == before  # deterministic: the nodes reproduce exactly what one process wrote
    _dvc("commit", "-f", "precompute@viker-0", "precompute@viker-1", cwd=repo)
    remote = tmp_path / "dvc-remote"
    _dvc("remote", "add", "-d", "-f", "shared", str(remote), cwd=repo)
    _dvc("push", "precompute@viker-0", "precompute@viker-1", cwd=repo)
    shutil.rmtree(repo / "work/cache/viker")
    _dvc("pull", "precompute@viker-0", "precompute@viker-1", cwd=repo)
    pulled = {path.name: path.read_bytes() for path in (repo / "work/cache/viker").glob("shard-*")}
    assert pulled == before


@pytest.mark.slow
def test_a_forced_rerun_writes_identical_caches_and_adapters(repo):
    """Same-machine determinism of the stages' outputs, not only of the metrics."""
    files = [
        *sorted((repo / "work/cache/base").glob("shard-*")),
        repo / "work/adapters/ga-s0/adapter_model.safetensors",
    ]
    before = {path: path.read_bytes() for path in files}
    _dvc("repro", "-f", "-s", "precompute@base-0", "precompute@base-1", "train@ga", cwd=repo)
    assert {path: path.read_bytes() for path in files} == before

"""Kill every stage with SIGKILL at random points, rerun it, and check that the outputs are byte-identical to
an uninterrupted run's (the figures that hold wall-clock times excepted).

    python tests/kill_resume.py [--kills 3] [--seed 0] [--work /tmp/kill-resume] [--out result.json]

It runs on a reduced mini world (10 people, 2 + 2 fine-tune epochs, a checkpoint every training step):
first every stage once without interruption (the reference), then, for each stage and each kill, a fresh
copy of the project as it was before that stage, the stage's command killed a random share of the way
into its work (timed from a marker that appears once the work has begun, not during its imports), and
the same command again to completion. tests/test_kill_resume.py runs it with one kill per stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SMALL_PARAMS = {
    "prepare-mini": {
        "num_people": 10, "num_real": 3, "num_reference_people": 6, "alt_images": 1,
        "fact_epochs": 2, "epochs": 2, "batch_size": 16, "people_per_split": 2,
    },
    "precompute": {"batch_size": 2},
    "teachers": {"viker": {"teacher": "viker", "args": {"k": 2}}},
    "train": {"epochs": 3, "batch_size": 2, "lr": 5e-4, "checkpoint_every": 1},
    "evaluate": {"limit": 2, "max_new_tokens": 6, "batch_size": 4},
    "seeds": "0,1",
    "methods": {"viker": {"loss": "viker", "forget_teacher": "viker", "args": {"lambda": 1.0}}},
}  # fmt: skip
COMMON = ["--model", "work/mini/model", "--data", "work/mini/data"]
# (stage, command, outputs): outputs are files or folders compared byte for byte (after TIMES is dropped).
# MARKERS: a path (glob) that appears once the stage's work has begun, so that kills land in the work
# and not in the seconds of imports before it.
MARKERS = {
    "prepare-mini": "work/mini/model.partial",
    "precompute-0": "work/cache/viker/.shard-00000-of-00002.parquet.*.tmp",
    "precompute-1": "work/cache/viker/.shard-00001-of-00002.parquet.*.tmp",
    "train": "work/adapters/viker-s0/checkpoints",
    "evaluate": "results/runs/viker-s0/.generation-journal.jsonl",
}
STAGES = [
    ("prepare-mini", ["prepare-mini", "--out", "work/mini", "--metrics-out", "metrics/full_model.json"],
     ["work/mini/data", "work/mini/references", "work/mini/model", "metrics/full_model.json"]),
    *[(f"precompute-{shard}", ["precompute", "--teacher", "viker", *COMMON, "--out", "work/cache/viker",
       "--shard-index", str(shard), "--num-shards", "2", "--no-progress"],
      [f"work/cache/viker/shard-0000{shard}-of-00002.parquet", f"work/cache/viker/shard-0000{shard}-of-00002.json"])
      for shard in (0, 1)],
    ("train", ["train", "--method", "viker", "--seeds", "0,1", *COMMON, "--out", "work/adapters/viker-s{seed}"],
     ["work/adapters/viker-s0", "work/adapters/viker-s1"]),
    ("evaluate", ["evaluate", *COMMON, "--seeds", "0,1", "--adapter", "work/adapters/viker-s{seed}",
                  "--out", "results/runs/viker-s{seed}/metrics.json", "--no-progress"],
     [f"results/runs/viker-s{seed}/{name}" for seed in (0, 1)
      for name in ("metrics.json", "responses.jsonl", "token_probs.json")]),
    ("report", ["report", "--runs", "results/runs", "--out", "results/report.md", "--no-token-plot"],
     ["results/report.md"]),
]  # fmt: skip
# Keys that hold wall-clock times: the only values a resumed run may write differently.
TIMES = {"seconds", "prepare_seconds", "train_seconds", "step_time_s"}


def without_times(value):
    if isinstance(value, dict):
        return {key: without_times(item) for key, item in value.items() if key not in TIMES}
    if isinstance(value, list):
        return [without_times(item) for item in value]
    return value


def digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(without_times(json.loads(data)), sort_keys=True).encode()
    elif path.suffix == ".csv":  # the step log: drop the step_time_s column
        rows = [line.split(",") for line in data.decode().splitlines()]
        keep = [index for index, name in enumerate(rows[0]) if name not in TIMES] if rows else []
        data = "\n".join(",".join(row[index] for index in keep) for row in rows).encode()
    return hashlib.sha256(data).hexdigest()


def snapshot(project: Path, outputs: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for output in outputs:
        path = project / output
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.is_file() and "checkpoints" not in file.parts and not file.name.startswith("."):
                found[str(file.relative_to(project))] = digest(file)
    return found


def environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start(project: Path, command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages", *command], cwd=project, env=environment(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def finish(process: subprocess.Popen, what: str) -> None:
    _, error = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed ({process.returncode}):\n{error[-3000:]}")


def marker_seen(project: Path, marker: str | None) -> bool:
    return marker is None or any(project.glob(marker))


def watch(process: subprocess.Popen, project: Path, marker: str | None) -> tuple[float, float]:
    """Run to the end; (seconds until the marker appeared, total seconds)."""
    started, seen = time.monotonic(), None
    while process.poll() is None:
        if seen is None and marker_seen(project, marker):
            seen = time.monotonic() - started
        time.sleep(0.01)
    total = time.monotonic() - started
    return (seen if seen is not None else 0.0), total


def kill_during_work(
    process: subprocess.Popen, project: Path, marker: str | None, after: float
) -> float | None:
    """SIGKILL the stage's process group `after` seconds into its work (once the marker is there);
    the kill's time since start, or None if the stage had finished first."""
    started = time.monotonic()
    while not marker_seen(project, marker):
        if process.poll() is not None:
            return None
        time.sleep(0.005)
    deadline = time.monotonic() + after
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return time.monotonic() - started


def remove(project: Path, outputs: list[str]) -> None:
    for output in outputs:
        path = project / output
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3, help="Kill points per stage.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/kill-resume")
    parser.add_argument("--out", default=None, help="JSON file for the counts.")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    reference = work / "reference"
    reference.mkdir(parents=True)
    (reference / "params.yaml").write_text(yaml.safe_dump(SMALL_PARAMS, sort_keys=False))
    results: dict[str, dict] = {}
    for name, command, outputs in STAGES:
        before = work / f"before-{name}"
        shutil.copytree(reference, before)
        marker = MARKERS.get(name)
        process = start(reference, command)
        work_starts, duration = watch(process, reference, marker)
        finish(process, f"{name} (reference)")
        expected = snapshot(reference, outputs)
        stage = {"reference_seconds": round(duration, 1), "work_starts_at": round(work_starts, 1)}
        stage.update({"kills": [], "identical": 0, "different": []})
        for kill in range(args.kills):
            trial = work / f"{name}-kill-{kill}"
            shutil.copytree(before, trial)
            remove(trial, outputs)
            after = rng.uniform(0.05, 0.95) * (duration - work_starts)
            at = kill_during_work(start(trial, command), trial, marker, after)
            finish(start(trial, command), f"{name} after a kill {after:.1f} s into its work")
            got = snapshot(trial, outputs)
            differing = sorted(key for key in set(got) | set(expected) if got.get(key) != expected.get(key))
            killed = at is not None
            stage["kills"].append(
                {"at_seconds": at and round(at, 2), "killed": killed, "differing": differing}
            )
            stage["identical"] += not differing
            stage["different"] += differing
            shutil.rmtree(trial)
        shutil.rmtree(before)
        results[name] = stage
        print(json.dumps({name: stage}), flush=True)
    summary = {
        "stages": results,
        "kills": sum(len(stage["kills"]) for stage in results.values()),
        "killed_mid_run": sum(kill["killed"] for stage in results.values() for kill in stage["kills"]),
        "identical": sum(stage["identical"] for stage in results.values()),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["identical"] == outcome["kills"] else 1)

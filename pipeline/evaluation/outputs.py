"""An evaluation's files beside --out: metrics.json (written last: a run is complete once it exists),
meta.json, responses.jsonl and token_probs.json, each replaced only once written whole."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.evaluation.questions import Question
from pipeline.files import write_atomic

TOKEN_PROBS = "token_probs.json"


def response_records(questions: list[Question]) -> list[dict[str, Any]]:
    """responses.jsonl's rows: every prompt, reply and score."""
    return [
        {
            "split": question.split,
            "item_id": question.item.item_id,
            "task": question.item.task,
            "modality": question.item.modality,
            "prompt": question.prompt,
            "generated": question.generated,
            "reply": question.reply,
            "target": question.item.target(),
            "scores": question.scores,
        }
        for question in questions
    ]


def write_outputs(
    out: Path,
    metrics: dict[str, Any],
    meta: dict[str, Any],
    questions: list[Question],
    token_probs: dict[str, Any] | None = None,
) -> None:
    """responses.jsonl, meta.json, token_probs.json (when given), then metrics.json at `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    records = response_records(questions)
    write_atomic(
        out.parent / "responses.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    )
    write_atomic(out.parent / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    if token_probs is not None:
        write_token_probs(out.parent, token_probs)
    write_atomic(out, json.dumps(metrics, indent=2) + "\n")


def write_token_probs(folder: Path, table: dict[str, Any]) -> Path:
    """token_probs.json: one forget sample's per-token H(R_i) and p(y_i) (the report's token plot)."""
    return write_atomic(folder / TOKEN_PROBS, json.dumps(table, indent=1, ensure_ascii=False) + "\n")


def finished_metrics(out: Path, key: str) -> dict[str, Any] | None:
    """The metrics of a completed run of the same inputs (resume key) at `out`, or None."""
    meta_path = out.parent / "meta.json"
    if not (out.is_file() and meta_path.is_file()):
        return None
    try:
        if json.loads(meta_path.read_text()).get("resume_key") != key:
            return None
        return json.loads(out.read_text())
    except json.JSONDecodeError:
        return None

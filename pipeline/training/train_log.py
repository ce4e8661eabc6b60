"""The step log, as CSV and JSON (both readable by `dvc plots`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

LOG_CSV, LOG_JSON = "train_log.csv", "train_log.json"


def write_log(directory: Path, log: list[dict[str, Any]]) -> None:
    if not log:
        return
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOG_JSON).write_text(json.dumps(log, indent=1))
    columns = list(dict.fromkeys(key for row in log for key in row))
    with (directory / LOG_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(log)

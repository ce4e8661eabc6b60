"""A journal of finished work units, so that a killed stage resumes where it stopped.

One JSON line per unit, appended and flushed to disk as each unit finishes; the first line is a key that
names everything the units depend on (a journal with another key is discarded, never reused). A line cut
short by a kill is ignored, so at worst the last unit is done again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Journal:
    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = Path(path), key
        self.done: dict[str, Any] = {}
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            if lines and _parsed(lines[0]) == {"key": key}:
                for line in lines[1:]:
                    entry = _parsed(line)
                    if isinstance(entry, dict) and "unit" in entry:
                        self.done[str(entry["unit"])] = entry["value"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Rewrite it with the entries that count: a stale key or a cut line goes now.
        with self.path.open("w") as handle:
            handle.write(json.dumps({"key": key}) + "\n")
            for unit, value in self.done.items():
                handle.write(json.dumps({"unit": unit, "value": value}, ensure_ascii=False) + "\n")
            _sync(handle)

    def record(self, unit: str, value: Any) -> None:
        self.done[unit] = value
        with self.path.open("a") as handle:
            handle.write(json.dumps({"unit": unit, "value": value}, ensure_ascii=False) + "\n")
            _sync(handle)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _parsed(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _sync(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())

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
        self.done: dict[str, Any] = _units(self.path, key)
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

    def absorb(self, other: Path) -> int:
        """Record the units another journal of the same key holds (a shard's); returns how many were new."""
        new = {unit: value for unit, value in _units(Path(other), self.key).items() if unit not in self.done}
        for unit, value in new.items():
            self.record(unit, value)
        return len(new)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _units(path: Path, key: str) -> dict[str, Any]:
    """unit -> value of the journal at `path`, if it exists and was written under `key`."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    if not lines or _parsed(lines[0]) != {"key": key}:
        return {}
    entries = [_parsed(line) for line in lines[1:]]
    return {str(e["unit"]): e["value"] for e in entries if isinstance(e, dict) and "unit" in e}


def _parsed(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _sync(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())

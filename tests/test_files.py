"""pipeline.files.write_atomic: the one way a file is written whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.files import write_atomic


def test_text_and_bytes_are_written_and_replace_what_was_there(tmp_path):
    target = tmp_path / "metrics.json"
    assert write_atomic(target, "first\n") == target
    assert target.read_text() == "first\n"
    write_atomic(str(target), b"\x00second")
    assert target.read_bytes() == b"\x00second"
    assert [path.name for path in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_a_write_that_fails_leaves_the_old_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text("complete old content")

    def half_written(self: Path, data: bytes) -> int:
        with self.open("wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"complete new content")
    assert target.read_text() == "complete old content"

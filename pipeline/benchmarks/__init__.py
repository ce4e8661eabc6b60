"""Benchmarks: one module per data layout, each parsing its files, naming its splits and detecting itself.

    mllmu       MLLMU-Bench's hub layout (MLLMMU/MLLMU-Bench; the mini world writes the same): forget_K,
                retain_(100-K), Test_Set, Retain_Set, Full_Set folders
    clear       CLEAR (therem/CLEAR): forget01|05|10, retain99|95|90 (image, caption, name), real_faces
                (image, answer, options), real_world (image, question, answer, options)
    local       one file per split, <split>.jsonl or <split>.parquet, of (image, question, answer) records
    items       what every layout gives: EvalItem(s), the Layout interface, DataError, samples_fingerprint
    rows        the shared readers of raw rows (split folders, fields, images) and rows_fingerprint
    references  ViKeR's reference pools and reference_root, where one is looked for
    prompts     MLLMU-Bench's task texts

Every stage reads its data through `layout(data_format, data)`: `unlearning_samples` for precompute and
training, `split_names`, `eval_items` and `split_files` for evaluation. `data_format: auto` detects the
layout from the folder and names what it looked for when none matches; a split name of another layout is
refused with the layout's own names. Adding a layout is one module and its line in LAYOUTS.

Importing this package is cheap (pyarrow loads on the first read), so stages/config.py takes the layout
names from here for `pipeline --help`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.benchmarks.clear import ClearLayout
from pipeline.benchmarks.items import DataError, EvalItem, EvalItems, Layout, open_ended, samples_fingerprint
from pipeline.benchmarks.local import LocalLayout
from pipeline.benchmarks.mllmu import MllmuLayout, forget_ratio
from pipeline.benchmarks.references import REFERENCE_KINDS, load_reference_pool, reference_root

# The registry of layouts, in the order `auto` tries them: the one list of their names.
LAYOUTS: dict[str, type[Layout]] = {cls.name: cls for cls in (MllmuLayout, ClearLayout, LocalLayout)}
LAYOUT_NAMES = tuple(LAYOUTS)

__all__ = [
    "LAYOUTS",
    "LAYOUT_NAMES",
    "REFERENCE_KINDS",
    "DataError",
    "EvalItem",
    "EvalItems",
    "Layout",
    "forget_ratio",
    "layout",
    "load_reference_pool",
    "open_ended",
    "reference_root",
    "samples_fingerprint",
]


def layout(data_format: str, root: str | Path) -> Layout:
    """The layout of a data folder: the one named, or (auto) the first that detects itself there."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root} is not a directory")
    if data_format != "auto":
        if data_format not in LAYOUTS:
            raise DataError(f"unknown data layout {data_format!r}; known: {', '.join(LAYOUT_NAMES)}")
        return LAYOUTS[data_format](root)
    for cls in LAYOUTS.values():
        if cls.detect(root):
            return cls(root)
    *others, last = [cls.looks_for for cls in LAYOUTS.values()]
    raise DataError(f"--data {root}: neither {', '.join(others)} nor {last}; set --data-format to say which")

"""The report's tables: each paper's own layout as data (split, metric, header), and the full tables of
every measure of every split (the appendix). Values are percentages of the means over seeds, with the
spread over seeds or the 95% interval over people (paired bootstrap) and seeds (t quantile)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.evaluation.bootstrap import PeopleAndSeeds
from pipeline.reporting.runs import Summary, display_name

Cell = tuple[str, str, str]  # (split, metric, column header)


@dataclass(frozen=True)
class PaperTable:
    """One paper table's columns, in its order; `source` cites the table."""

    title: str
    source: str
    cells: tuple[Cell, ...]


# ViKeR Table 1 (MLLMU): Forget and Generalization by Acc and Gib, Retain and Real by Rouge, BLEU and Gib.
VIKER_TABLE_1 = PaperTable(
    "MLLMU-Bench in ViKeR's layout",
    "ViKeR Table 1",
    (("forget", "mc_acc", "Forget Acc"), ("forget", "coherence", "Forget Gib↑"),
     ("test", "mc_acc", "Generalization Acc"), ("test", "coherence", "Generalization Gib↑"),
     ("retain", "rougeL", "Retain Rouge↑"), ("retain", "bleu", "Retain BLEU↑"),
     ("retain", "coherence", "Retain Gib↑"),
     ("real", "rougeL", "Real Rouge↑"), ("real", "bleu", "Real BLEU↑"), ("real", "coherence", "Real Gib↑")),
)  # fmt: skip
# Vgid Table 3: Forget, Test and Retain Set, each by Cloze Acc, Classification Acc and Generation ROUGE-L.
VGID_TABLE_3 = PaperTable(
    "MLLMU-Bench in Vgid's layout",
    "Vgid Table 3",
    tuple(
        (split, metric, f"{title} {name} {arrow}")
        for split, title, arrow in (
            ("forget", "Forget", "↓"),
            ("test", "Test", "↓"),
            ("retain", "Retain", "↑"),
        )
        for metric, name in (("cloze_acc", "Cloze.Acc"), ("mc_acc", "Class.Acc"), ("rougeL", "Gen.RL"))
    ),
)
# ViKeR Table 2 (CLEAR): Forget and Retain by Rec and Gib, Real QA by Acc on authors' and world images.
CLEAR_CELLS: tuple[Cell, ...] = (
    ("forget", "rec", "Forget Rec"), ("forget", "coherence", "Forget Gib"),
    ("retain", "rec", "Retain Rec"), ("retain", "coherence", "Retain Gib"),
    ("real_faces", "mc_acc", "Real QA Acc (Aut)"), ("real_world", "mc_acc", "Real QA Acc (Wor)"),
)  # fmt: skip
VIKER_TABLE_2 = PaperTable("CLEAR in ViKeR's layout", "ViKeR Table 2", CLEAR_CELLS)
CLEAR_LEGEND = (
    'Rec: the person\'s name appears in the answer to "What is the name of the person in the image?" '
    "(lower on Forget means more forgetting, higher on Retain more retention). Gib: coherence of those "
    "answers. Acc: multiple choice on real authors' faces (Aut) and real-world images (Wor)."
)

# The appendix: every measure (COLUMNS) of every split group, image + text and text-only questions.
SPLIT_GROUPS = (("forget", "Forget"), ("test", "Generalization"), ("retain", "Retain"), ("real", "Real"))
CLEAR_GROUPS = (("forget", "Forget"), ("retain", "Retain"), ("real_faces", "Real faces"),
                ("real_world", "Real world"))  # fmt: skip
REVERSE_GROUPS = (("forget", "Forget"), ("forget_reverse", "Forget w/ reverse"),
                  ("test", "Test"), ("test_reverse", "Test w/ reverse"))  # fmt: skip
COLUMNS = (("mc_acc", "ACC"), ("cloze_acc", "Cloze"), ("rougeL", "ROUGE-L"), ("bleu", "BLEU"),
           ("coherence", "GIB"), ("rec", "REC"))  # fmt: skip
MIA_COLUMNS = (("loss_auc", "LOSS AUC"), ("min_k_auc", "Min-K% AUC"), ("zlib_auc", "zlib AUC"))


def cell(
    summary: Summary, method: str, split: str, metric: str, resamples: PeopleAndSeeds | None = None
) -> str:
    """A mean in %, with its interval over people and seeds when resampled, else ± the std over seeds; '-'
    if absent."""
    entry = summary.get(method, {}).get(split, {}).get(metric)
    if entry is None:
        return "-"
    mean, std, _ = entry
    interval = resamples.interval((method, split, metric)) if resamples else None
    if interval is not None:
        return f"{100 * mean:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f}±{100 * std:.1f}"


def cells_table(
    summary: Summary, methods: Sequence[str], cells: Sequence[Cell], resamples: PeopleAndSeeds | None
) -> str:
    """One row per method, one column per (split, metric, header) that some method has (values in %)."""
    present = [cell for cell in cells if any(cell[1] in summary.get(m, {}).get(cell[0], {}) for m in methods)]
    header = "| Method | " + " | ".join(name for _, _, name in present) + " |"
    rule = "|---|" + "---|" * len(present)
    rows = [
        f"| {display_name(method)} | "
        + " | ".join(cell(summary, method, split, metric, resamples) for split, metric, _ in present)
        + " |"
        for method in methods
    ]
    return "\n".join([header, rule, *rows])


def markdown_table(
    summary: Summary,
    methods: Sequence[str],
    groups: Sequence[tuple[str, str]],
    columns: Sequence[tuple[str, str]],
    prefix: str = "",
    resamples: PeopleAndSeeds | None = None,
) -> str:
    """One row per method; every column of every split group, `prefix` naming a variant (text_)."""
    return cells_table(summary, methods, group_cells(groups, columns, prefix), resamples)


def group_cells(
    groups: Sequence[tuple[str, str]], columns: Sequence[tuple[str, str]], prefix: str = ""
) -> list[Cell]:
    """Each column of each split group, headed `<group title> <column name>`."""
    return [
        (split, f"{prefix}{metric}", f"{title} {name}") for split, title in groups for metric, name in columns
    ]


def has_cells(summary: Summary, methods: Sequence[str], cells: Sequence[Cell]) -> bool:
    """Whether any method has any of the cells (a table with no column is left out)."""
    return any(metric in summary.get(m, {}).get(split, {}) for split, metric, _ in cells for m in methods)

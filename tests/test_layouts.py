"""Data layouts: detection, each layout's split names and items, and the errors for a layout mismatch."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.benchmarks import LAYOUT_NAMES, LAYOUTS, DataError, layout
from pipeline.benchmarks.clear import CLEAR_NAME_QUESTION
from stages.config import DATA_FORMATS, EvaluateConfig
from stages.evaluate import run

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent


def test_the_registry_is_the_one_list_of_layout_names():
    """The CLI's choices are the registry's names (in the order auto tries them) and auto."""
    assert DATA_FORMATS == ("auto", *LAYOUT_NAMES) == ("auto", *LAYOUTS)
    assert all(cls.name == name for name, cls in LAYOUTS.items())
    modules = sorted(path.stem for path in (REPO / "pipeline" / "benchmarks").glob("*.py"))
    assert set(LAYOUT_NAMES) <= set(modules)  # one module per layout, named as the layout
    for path in [REPO / "stages" / "config.py", *(REPO / "pipeline" / "benchmarks").glob("*.py")]:
        text = path.read_text()
        assert '"mllmu", "clear"' not in text and "'mllmu', 'clear'" not in text, path


def test_importing_the_registry_loads_no_heavy_library():
    """stages/config.py takes the names from the registry, and `pipeline --help` imports it."""
    code = "import sys, stages.config; print(sorted({'pyarrow', 'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("folder", "expected"),
    [("mllmu_bench", "mllmu"), ("mllmu_train", "mllmu"), ("clear", "clear"), ("local", "local")],
)
def test_each_layout_detects_its_own_fixture_and_refuses_the_others(folder, expected):
    """Each layout module's `detect` recognises its own folder; no other layout claims it."""
    root = FIXTURES / folder
    assert [name for name, cls in LAYOUTS.items() if cls.detect(root)] == [expected]
    assert LAYOUTS[expected].__module__ == f"pipeline.benchmarks.{expected}"


@pytest.mark.parametrize(
    ("folder", "expected"),
    [("mllmu_bench", "mllmu"), ("mllmu_train", "mllmu"), ("clear", "clear"), ("local", "local")],
)
def test_auto_detects_each_layout(folder, expected):
    assert layout("auto", FIXTURES / folder).name == expected


def test_a_folder_in_no_layout_is_one_error_naming_what_was_looked_for(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"neither MLLMU-Bench's layout .*CLEAR's .*--data-format"):
        layout("auto", tmp_path)
    with pytest.raises(DataError, match="is not a directory"):
        layout("auto", tmp_path / "missing")


def test_clear_split_names_and_items():
    clear = layout("clear", FIXTURES / "clear")
    assert clear.split_names("forget05") == {
        "forget": "forget05",
        "retain": "retain95",
        "real_faces": "real_faces",
        "real_world": "real_world",
    }
    forget = clear.eval_items("forget05")
    assert [item.question for item in forget.generation] == [CLEAR_NAME_QUESTION] * 2
    assert {item.person_name for item in forget.generation} == {"Mara Holt"}
    assert forget.person_ids() == ["Mara Holt"]
    faces = clear.eval_items("real_faces").classification
    assert [(item.correct_letter, item.ground_truth) for item in faces] == [
        ("B", "Jane Austen"),
        ("A", "Leo Tolstoy"),
    ]
    world = clear.eval_items("real_world").classification  # the hub's real_world file is test-00000-of-00001
    assert world[0].question == "What colour fills the image?" and world[0].options["C"] == "blue"
    samples = clear.unlearning_samples("forget05", ("qa",))
    assert [(s.question, s.answer) for s in samples] == [(CLEAR_NAME_QUESTION, "Mara Holt")] * 2
    with pytest.raises(DataError, match="CLEAR has qa"):
        clear.unlearning_samples("forget05", ("cloze",))


def test_a_split_name_of_the_other_layout_is_refused_with_this_layouts_names():
    mllmu = layout("mllmu", FIXTURES / "mllmu_bench")
    with pytest.raises(DataError, match=r"'forget05' is a CLEAR name.*MLLMU-Bench's layout"):
        mllmu.eval_items("forget05")
    with pytest.raises(DataError, match=r"'retain95' is a CLEAR name"):
        mllmu.split_names("retain95")
    clear = layout("clear", FIXTURES / "clear")
    with pytest.raises(DataError, match=r"forget split 'forget_5': CLEAR names its forget splits forget01"):
        clear.split_names("forget_5")
    with pytest.raises(DataError, match=r"'Test_Set' is not a CLEAR config"):
        clear.eval_items("Test_Set")


def test_a_real_faces_answer_outside_its_options_names_the_row(tmp_path):
    shutil.copytree(FIXTURES / "clear", tmp_path / "clear")
    path = tmp_path / "clear" / "real_faces" / "train-00000-of-00001.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[1]["answer"] = "Someone Else"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(
        DataError, match=r"real_faces/train-00000-of-00001.parquet: row 1: answer 'Someone Else'"
    ):
        layout("clear", tmp_path / "clear").eval_items("real_faces")


def test_local_split_files(tmp_path):
    for split in ("forget", "retain"):
        shutil.copy(FIXTURES / "local" / "samples.jsonl", tmp_path / f"{split}.jsonl")
    shutil.copytree(FIXTURES / "local" / "images", tmp_path / "images")
    local = layout("auto", tmp_path)
    assert local.split_names("forget") == {"forget": "forget", "retain": "retain"}
    items = local.eval_items("forget").generation
    assert [item.ground_truth for item in items] == [
        json.loads(line)["answer"] for line in (tmp_path / "forget.jsonl").read_text().splitlines()
    ]
    with pytest.raises(DataError, match=r"local split 'forget_9': neither .*forget_9.jsonl nor .parquet"):
        local.eval_items("forget_9")


def test_evaluate_scores_clear_as_viker_reports_it(tiny_model_dir, tmp_path):
    """Identification (REC) and coherence on forget and retain, multiple choice on the real sets."""
    out = tmp_path / "run" / "metrics.json"
    config = EvaluateConfig(
        model=str(tiny_model_dir),
        data=str(FIXTURES / "clear"),
        out=str(out),
        forget_split="forget05",
        max_new_tokens=4,
        progress=False,
    )
    metrics = run(config)
    assert set(metrics) == {"forget", "retain", "real_faces", "real_world", "meta"}
    for role in ("forget", "retain"):
        assert {"rec", "rougeL", "coherence"} <= set(metrics[role]) and "mc_acc" not in metrics[role]
        assert 0.0 <= metrics[role]["rec"] <= 1.0
    for role in ("real_faces", "real_world"):
        assert set(metrics[role]) == {"mc_acc"}
    meta = json.loads((out.parent / "meta.json").read_text())
    assert meta["split_names"]["retain"] == "retain95"
    assert meta["few_shot_profiles"] == {"classification": 0, "cloze": 0}  # CLEAR has no exemplar profiles


def test_local_split_files_go_through_precompute_train_and_evaluate(tiny_model_dir, tmp_path):
    """A user's own JSONL files through every stage, selected by --data-format local."""
    from click.testing import CliRunner

    from stages.cli import main

    data = tmp_path / "data"
    data.mkdir()
    records = (FIXTURES / "local" / "samples.jsonl").read_text().splitlines()
    cities = ("Tallinn", "Basel", "Turku", "Rome")
    for split, person in (("forget", "Mara Holt"), ("retain", "Ivo Brenner")):
        more = [json.dumps({"question": f"Where did {person} live in {year}?", "answer": f"In {city}.",
                            "person_id": person}) for year, city in zip((1990, 2000, 2010, 2020), cities, strict=True)]  # fmt: skip
        (data / f"{split}.jsonl").write_text(
            "\n".join([*records, *more]) + "\n"
        )  # 4+ answers: the scorer fits
    shutil.copytree(FIXTURES / "local" / "images", data / "images")
    (tmp_path / "params.yaml").write_text("{}\n")
    common = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--data-format",
        "local",
        "--forget-split",
        "forget",
    ]
    runner = CliRunner()
    steps = [
        ["precompute", "--teacher", "original", "--out", str(tmp_path / "cache"), "--no-progress"],
        ["train", "--method", "ga", "--out", str(tmp_path / "ga"), "--max-steps", "1", "--batch-size", "1"],
        ["evaluate", "--adapter", str(tmp_path / "ga"), "--out", str(tmp_path / "run/metrics.json"),
         "--max-new-tokens", "4", "--no-progress"],
    ]  # fmt: skip
    for step in steps:
        result = runner.invoke(main, ["--params", str(tmp_path / "params.yaml"), *step, *common])
        assert result.exit_code == 0, (step[0], result.output)
    assert (tmp_path / "cache" / "shard-00000-of-00001.parquet").is_file()
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert set(metrics) == {"forget", "retain", "meta"} and 0 <= metrics["forget"]["rougeL"] <= 1


def test_no_benchmark_module_reaches_into_anothers_private_helpers():
    """Each layout module uses the shared readers (rows, items) and the others' public names only."""
    for path in sorted((REPO / "pipeline" / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                own = node.value.id in ("self", "cls")
                assert own or not private, f"{path.name} reads {node.value.id}.{node.attr}"

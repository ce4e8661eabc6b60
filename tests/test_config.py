"""One declaration per parameter: the stage configs are the schema, the CLI comes from them, params.yaml
holds the values (the project's layering is tests/test_architecture.py's)."""

from __future__ import annotations

from dataclasses import MISSING

import pytest
import yaml
from click.testing import CliRunner
from project_imports import REPO, project_files

from pipeline.config import ConfigError, build, check_section, find_params, schema
from pipeline.unlearning.methods import MethodError, resolve_method
from stages.cli import main
from stages.config import SECTIONS, PrecomputeConfig, TrainConfig


def test_every_option_default_is_its_field_default():
    for command_name, config_class in SECTIONS.items():
        command = main.commands[command_name]
        by_name = {parameter.name: parameter for parameter in command.params}
        for option in schema(config_class):
            parameter = by_name[option.name]
            if option.default is MISSING:
                assert parameter.required, (command_name, option.name)
            elif isinstance(option.default, tuple):
                assert parameter.default == ",".join(map(str, option.default)), (command_name, option.name)
            elif isinstance(option.default, dict):
                assert parameter.multiple and not option.default, (command_name, option.name)
            else:
                assert parameter.default == option.default, (command_name, option.name)
        # and no option that the schema does not declare, beside --seeds
        assert set(by_name) - {option.name for option in schema(config_class)} <= {"seeds"}


def test_option_names_are_unique_across_nested_configs():
    for config_class in SECTIONS.values():
        names = [option.name for option in schema(config_class)]
        assert len(names) == len(set(names))


def test_build_reads_comma_lists_and_nested_fields():
    config = build(
        PrecomputeConfig, {"model": "m", "data": "d", "out": "o", "kinds": "qa,mc", "args": ("k=3",)}
    )
    assert config.kinds == ("qa", "mc") and config.args == {"k": 3} and config.top_p == 0.9
    from stages.config import PrepareConfig

    prepare = build(PrepareConfig, {"num_people": 7, "epochs": 2, "vocab_size": 300})
    assert prepare.world.num_people == 7 and prepare.fine_tune.epochs == 2
    assert prepare.fine_tune.model.vocab_size == 300


def test_the_shipped_params_file_fits_the_schema_and_every_method_its_loss():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, config_class in SECTIONS.items():
        if name in params:
            check_section(name, params[name], config_class, "params.yaml")
    for name in params["methods"]:
        method = resolve_method(name, params["methods"])
        assert method.loss in {
            "ga", "ga_diff", "kl_min", "npo", "po", "idkpo", "rmu", "mmunlearner", "viker", "vgid"
        }  # fmt: skip
    viker = resolve_method("viker", params["methods"])
    assert viker.arguments == {"lambda_": params["methods"]["viker"]["args"]["lambda"]}


def test_an_unknown_key_names_the_key_and_the_section(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"lrr": 0.1}}))
    result = CliRunner().invoke(main, ["--params", str(params), "train", "--help"])
    assert result.exit_code != 0
    assert "unknown key 'lrr' in section 'train'" in result.output and "lr" in result.output
    params.write_text(yaml.safe_dump({"trian": {"lr": 0.1}}))
    result = CliRunner().invoke(main, ["--params", str(params), "train", "--help"])
    assert result.exit_code != 0 and "unknown section 'trian'" in result.output


def test_shared_sections_give_every_command_its_options_and_a_commands_own_section_wins(tmp_path):
    from stages.cli import load_sections

    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "model": {"model": "m", "dtype": "bf16"},
                "data": {"data": "d", "forget_split": "forget_5"},
                "evaluate": {"forget_split": "forget_15"},
            }
        )
    )
    default_map, _ = load_sections(str(params))
    for command in ("precompute", "train", "relearn", "evaluate"):
        assert default_map[command]["model"] == "m" and default_map[command]["dtype"] == "bf16"
        assert default_map[command]["data"] == "d"
    assert default_map["train"]["forget_split"] == "forget_5"
    assert default_map["evaluate"]["forget_split"] == "forget_15"
    assert "model" not in default_map["report"] and "data" not in default_map["prepare-mini"]
    params.write_text(yaml.safe_dump({"data": {"data": "d", "lr": 0.1}}))
    result = CliRunner().invoke(main, ["--params", str(params), "train", "--help"])
    assert result.exit_code != 0 and "unknown key 'lr' in section 'data'" in result.output


def test_out_of_range_values_are_refused_at_parse_time(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    common = [
        "--params",
        str(params),
        "precompute",
        "--model",
        "nowhere",
        "--data",
        "d",
        "--out",
        str(tmp_path),
    ]
    for option, value in (
        ("--top-p", "1.5"),
        ("--top-p", "0"),
        ("--max-support", "0"),
        ("--batch-size", "0"),
    ):
        result = CliRunner().invoke(main, [*common, option, value])
        assert result.exit_code == 2 and option in result.output, (option, value, result.output)
    assert not any(tmp_path.glob("shard-*"))  # nothing was written
    # The same rule and words as a loss's or a teacher's argument (pipeline.arguments).
    result = CliRunner().invoke(main, [*common, "--top-p", "0"])
    assert "value 0.0 is out of range (must be > 0 and <= 1)" in result.output


def test_params_are_found_at_the_project_root_or_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("train: {lr: 0.25}\n")
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    assert find_params(None) == tmp_path / "params.yaml"
    with pytest.raises(ConfigError, match="--params missing.yaml: no such file"):
        find_params("missing.yaml")
    result = CliRunner().invoke(main, ["train", "--help"])
    assert "0.25" in result.output  # the value of the project's params.yaml, found from a subfolder
    assert f"params: {tmp_path / 'params.yaml'}" in result.stderr  # it says which file it used
    empty = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    empty.mkdir()
    monkeypatch.chdir(empty)
    if find_params(None) is None:  # no params.yaml above the temporary folder
        result = CliRunner().invoke(main, ["train", "--help"])
        assert "options take their schema defaults" in result.stderr


def test_train_by_hand_uses_the_methods_arguments_from_params(tmp_path, monkeypatch):
    """`pipeline train --method viker` trains with params.yaml's lambda, and --arg overrides it."""
    import stages.train

    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "caches": {"cache_root": "caches"},
                "methods": {"viker": {"loss": "viker", "forget_teacher": "c", "args": {"lambda": 0.7}}},
            }
        )
    )
    seen = []
    monkeypatch.setattr(stages.train, "run", lambda config, method: seen.append((config, method)) or {})
    common = [
        "--params",
        str(params),
        "train",
        "--model",
        "m",
        "--data",
        "d",
        "--out",
        "o",
        "--method",
        "viker",
    ]
    assert CliRunner().invoke(main, common).exit_code == 0
    assert CliRunner().invoke(main, [*common, "--arg", "lambda=0.2", "--arg", "no_ga=true"]).exit_code == 0
    (_, by_hand), (_, overridden) = seen
    assert by_hand.loss == "viker" and by_hand.arguments == {"lambda_": 0.7}
    assert by_hand.forget_teacher == "c" and by_hand.forget_cache == "caches/c"  # <cache_root>/<entry>
    assert overridden.arguments == {"lambda_": 0.2, "no_ga": True}


def test_a_methods_unknown_argument_is_refused_with_the_accepted_list():
    with pytest.raises(MethodError, match=r"loss 'npo' takes no argument 'lambda'; it accepts: beta"):
        resolve_method("npo", {"npo": {"loss": "npo", "args": {"lambda": 1.0}}})
    with pytest.raises(MethodError, match="unknown key"):
        resolve_method("x", {"x": {"loss": "ga", "lr": 1.0}})
    with pytest.raises(MethodError, match="unknown loss 'nope'"):
        resolve_method("nope", {})


def test_training_meta_keys_only_the_methods_own_arguments():
    fields = {option.name for option in schema(TrainConfig)}
    assert not fields & {"lambda_", "alpha", "beta", "npo_beta", "no_ga", "regularizer"}


# ---------------------------------------------------------------- environment


def test_no_environment_variable_carries_an_option():
    """Options reach the stages as config fields (torchrun workers get them on their command line)."""
    for path in project_files():
        assert "PIPELINE_" not in (REPO / path).read_text(), path


@pytest.mark.parametrize(
    "loss, args, message",
    [
        ("viker", {"lambda": -1}, "lambda -1 is out of range"),
        ("viker", {"lambda": "high"}, "lambda must be a number"),
        ("viker", {"regularizer": "l2"}, "regularizer 'l2' is not one of kl, jsd, cosine"),
        ("viker", {"no_ga": 1}, "no_ga must be true or false"),
        ("npo", {"beta": 0}, "beta 0 is out of range"),
        ("vgid", {"alpha": -0.5}, "alpha -0.5 is out of range"),
    ],
)
def test_method_arguments_are_checked_against_their_declared_type_and_range(loss, args, message):
    with pytest.raises(MethodError, match=message):
        resolve_method(loss, {loss: {"loss": loss, "args": args}})


def test_a_bad_method_argument_on_the_command_line_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(
        main, ["--params", str(REPO / "params.yaml"), "train", "--model", "m", "--data", "d", "--out", "o",
               "--method", "viker", "--arg", "lambda=-1"],
    )  # fmt: skip
    assert result.exit_code == 1 and "lambda -1 is out of range" in result.output
    assert "Traceback" not in result.output

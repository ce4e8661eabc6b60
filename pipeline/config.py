"""Configuration: a stage's config dataclass is its schema, the CLI is generated from it, params.yaml holds
the values.

Each parameter is declared once, as a dataclass field made with `param` (default, help text, allowed
range or choices; a range is a pipeline.arguments.Range, checked by the rule a loss's arguments are).
`options(Config)` turns the fields into click options, nested config dataclasses flattened (every leaf name is unique, so a params.yaml section is one flat mapping); `build(Config,
values)` makes the config back from option values. `find_params` locates params.yaml (the nearest one at
or above the working directory, or `--params FILE`) and `check_section` refuses a key the schema does not
declare, naming the key and the section.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.arguments import Range, out_of_range

PARAMS_FILE = "params.yaml"


class ConfigError(click.UsageError):
    """A params.yaml file or an option value that the schema refuses; the message names it."""


def param(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    default_factory: Callable[[], Any] | Any = MISSING,
) -> Any:
    """A config field: its default, its help text and the values it accepts (checked when parsed)."""
    metadata = {"help": help, "choices": choices, "range": Range(low, high, low_open)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Option:
    """One leaf field of a (possibly nested) config dataclass, as the CLI and params.yaml see it."""

    path: tuple[str, ...]  # field names from the top config down to the leaf
    annotation: Any
    default: Any  # MISSING when the option is required
    help: str
    choices: tuple[str, ...] | None
    range: Range

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def flag(self) -> str:
        return "--" + self.name.rstrip("_").replace("_", "-")


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        arguments = [argument for argument in typing.get_args(annotation) if argument is not type(None)]
        if len(arguments) == 1:
            return arguments[0], True
    return annotation, False


def schema(config_class: type, prefix: tuple[str, ...] = ()) -> list[Option]:
    """The leaf options of a config dataclass, nested dataclasses flattened; leaf names must be unique."""
    hints = typing.get_type_hints(config_class)
    found: list[Option] = []
    for field in dataclasses.fields(config_class):
        if not field.init:
            continue
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            found += schema(annotation, (*prefix, field.name))
            continue
        default = field.default
        if default is MISSING and field.default_factory is not MISSING:
            default = field.default_factory()
        found.append(
            Option(
                path=(*prefix, field.name),
                annotation=annotation,
                default=default,
                help=field.metadata.get("help", ""),
                choices=field.metadata.get("choices"),
                range=field.metadata.get("range", Range()),
            )
        )
    names = [option.name for option in found]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated and not prefix:
        raise TypeError(f"{config_class.__name__}: option names declared twice: {', '.join(repeated)}")
    return found


class RangedNumber(click.ParamType):
    """An int or float option checked against its Range (pipeline.arguments: the one range check)."""

    def __init__(self, number: type, allowed: Range) -> None:
        self.number, self.allowed = number, allowed
        self.name = f"{number.__name__} {allowed}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.INT if self.number is int else click.FLOAT
        converted = number.convert(value, param, ctx)
        problem = out_of_range("value", converted, self.allowed)
        if problem:
            self.fail(problem, param, ctx)
        return converted


def _click_type(option: Option) -> Any:
    base, _ = _unwrap_optional(option.annotation)
    if option.choices:
        return click.Choice(option.choices)
    if base in (int, float):
        return RangedNumber(base, option.range) if option.range else base
    return str


def _comma_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(item) for item in value)
    return tuple(item.strip() for item in str(value).split(",") if item.strip())


def _key_values(pairs: Any) -> dict[str, Any]:
    """KEY=VALUE strings (values read as YAML scalars: 0.5, true, kl) or a mapping (from params.yaml)."""
    if isinstance(pairs, dict):
        return dict(pairs)
    parsed: dict[str, Any] = {}
    for pair in pairs or ():
        key, separator, value = str(pair).partition("=")
        if not separator or not key:
            raise ConfigError(f"--arg {pair!r}: write it as KEY=VALUE, e.g. --arg lambda=0.5")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def _click_option(option: Option) -> Callable:
    base, optional = _unwrap_optional(option.annotation)
    required = option.default is MISSING
    help_text = option.help
    if base is bool:
        flag = option.flag
        return click.option(
            f"{flag}/--no-{flag[2:]}", option.name, default=option.default, show_default=True, help=help_text
        )
    if typing.get_origin(base) is dict:
        return click.option(
            "--arg",
            option.name,
            multiple=True,
            help=help_text or "KEY=VALUE, repeatable.",
            metavar="KEY=VALUE",
        )
    default = option.default
    if typing.get_origin(base) is tuple:
        default = None if default is MISSING else ",".join(map(str, default))
    return click.option(
        option.flag,
        option.name,
        type=_click_type(option),
        default=None if required else default,
        required=required,
        show_default=not required and default is not None,
        help=help_text + ("" if not optional or default is not None else " [default: none]"),
    )


def options(config_class: type) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per leaf field of `config_class`."""

    def decorate(command: Callable) -> Callable:
        for option in reversed(schema(config_class)):
            command = _click_option(option)(command)
        return command

    return decorate


def _converted(option: Option, value: Any) -> Any:
    base, _ = _unwrap_optional(option.annotation)
    if value is None:
        return None
    if typing.get_origin(base) is tuple:
        return _comma_list(value)
    if typing.get_origin(base) is dict:
        return _key_values(value)
    return value


def build(config_class: type, values: dict[str, Any], prefix: tuple[str, ...] = ()) -> Any:
    """The config from option values keyed by leaf name (missing ones keep their field default)."""
    hints = typing.get_type_hints(config_class)
    by_path = {option.path: option for option in schema(config_class, prefix)}
    arguments: dict[str, Any] = {}
    for field in dataclasses.fields(config_class):
        if not field.init:
            continue
        path = (*prefix, field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            arguments[field.name] = build(hints[field.name], values, path)
        elif field.name in values:
            arguments[field.name] = _converted(by_path[path], values[field.name])
    return config_class(**arguments)


# ---------------------------------------------------------------- params.yaml


def find_params(explicit: str | None) -> Path | None:
    """`--params FILE` (which must exist), else the nearest params.yaml at or above the working directory."""
    if explicit:
        path = Path(explicit)
        if not path.exists() or path.is_dir():
            raise ConfigError(f"--params {explicit}: no such file")
        return path
    for directory in [Path.cwd(), *Path.cwd().parents]:
        if (directory / PARAMS_FILE).is_file():
            return directory / PARAMS_FILE
    return None


def read_params(path: Path | None) -> dict[str, Any]:
    """The file's sections; says on stderr which file it used when that is not ./params.yaml, or that none
    was found (then every option has its schema default)."""
    if path is None:
        print(
            f"params: no {PARAMS_FILE} in {Path.cwd()} or above; options take their schema defaults",
            file=sys.stderr,
        )
        return {}
    if path.resolve() != (Path.cwd() / PARAMS_FILE).resolve():
        print(f"params: {path}", file=sys.stderr)
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of section -> values, got {type(params).__name__}")
    return params


def check_section(section: str, values: Any, config_class: type, where: str) -> dict[str, Any]:
    """The section's values keyed by option name; an unknown key is an error naming it and the section."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section {section!r} must be a mapping, got {type(values).__name__}")
    known = {option.name for option in schema(config_class)}
    unknown = sorted(str(key) for key in values if str(key).replace("-", "_") not in known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {', '.join(repr(key) for key in unknown)} in section {section!r}; "
            f"known: {', '.join(sorted(known))}"
        )
    # YAML lists stand for comma lists (the CLI's form of a tuple option).
    return {
        str(key).replace("-", "_"): ",".join(map(str, value)) if isinstance(value, list) else value
        for key, value in values.items()
    }

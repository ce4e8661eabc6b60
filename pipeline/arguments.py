"""Declared arguments: the one check of a value against its declared type, choices and range.

A loss (pipeline.unlearning.losses) and a teacher (pipeline.unlearning.teachers) declare their own
arguments as keyword-only parameters with a type, a default and, where the values are limited, a
`Literal[...]` of choices or an `Annotated[..., Range(...)]`; a config field (pipeline.config) declares
its range with `param(low=..., high=...)`, which is the same Range. `checked_arguments` takes a params.yaml
entry's `args` against a function's declaration: an unknown argument is refused with the list the
function accepts, a value of the wrong type or out of range with its name and the rule.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """The numbers an argument or option accepts: low (inclusive unless low_open) to high (inclusive)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or value <= self.high)

    def __bool__(self) -> bool:
        return (self.low, self.high) != (None, None)

    def __str__(self) -> str:
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
        high = "" if self.high is None else f"<= {self.high}"
        return " and ".join(part for part in (low, high) if part)


def out_of_range(name: str, value: float, allowed: Range) -> str | None:
    """The message for a value outside its range, or None: the one range check of the project."""
    if allowed.holds(value):
        return None
    return f"{name} {value!r} is out of range (must be {allowed})"


def public_name(parameter: str) -> str:
    """An argument's name in params.yaml and on the command line (`lambda_` -> `lambda`)."""
    return parameter.rstrip("_")


def declared_arguments(function: Callable) -> dict[str, object]:
    """A function's own arguments (its keyword-only parameters) with their defaults, in declared order."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def value_problem(annotation: Any, name: str, value: Any) -> str | None:
    """Why `value` does not fit its declared type, choices (Literal) and range (Annotated Range), or None."""
    ranges = [extra for extra in getattr(annotation, "__metadata__", ()) if isinstance(extra, Range)]
    base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
    if typing.get_origin(base) is typing.Literal:
        if value not in typing.get_args(base):
            return f"{name} {value!r} is not one of {', '.join(map(str, typing.get_args(base)))}"
        return None
    if base is bool and not isinstance(value, bool):
        return f"{name} must be true or false, got {value!r}"
    if base is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{name} must be a number, got {value!r}"
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{name} must be a whole number, got {value!r}"
    if base is str and not isinstance(value, str):
        return f"{name} must be a string, got {value!r}"
    for allowed in ranges:
        problem = out_of_range(name, value, allowed)
        if problem:
            return problem
    return None


def checked_arguments(
    function: Callable, arguments: dict[str, Any], what: str, where: str, error: type[Exception]
) -> dict[str, Any]:
    """`arguments` (public names) keyed by `function`'s parameter names, each checked; raises `error`
    naming `what` (e.g. "loss 'npo'") for an argument it does not take or a value it does not accept."""
    accepted = {public_name(parameter): parameter for parameter in declared_arguments(function)}
    unknown = sorted(key for key in arguments if public_name(key) not in accepted)
    if unknown:
        raise error(
            f"{where}: {what} takes no argument {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(sorted(accepted)) or 'none'}"
        )
    hints = typing.get_type_hints(function, include_extras=True)
    checked = {accepted[public_name(key)]: value for key, value in arguments.items()}
    for parameter, value in checked.items():
        problem = value_problem(hints[parameter], public_name(parameter), value)
        if problem:
            raise error(f"{where}: {problem}")
    return checked

"""Unlearning methods: a named loss with its own arguments and the caches it reads (params.yaml `methods`).

    methods:
      viker: {loss: viker, forget_cache: work/cache/viker, args: {lambda: 1.0}}
      viker_no_ga: {loss: viker, forget_cache: work/cache/viker, args: {lambda: 1.0, no_ga: true}}

A method owns its arguments: they are checked against the keyword-only parameters of its loss
(pipeline.unlearning.losses), so a misspelt or foreign argument is refused with the list the loss accepts, and a
run records only its own. An argument is named as in the paper; a parameter that would be a Python
keyword carries a trailing underscore in the loss (`lambda` -> `lambda_`).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

ENTRY_KEYS = ("loss", "args", "forget_cache", "retain_cache")


class MethodError(ValueError):
    """A method entry or argument that its loss does not accept; the message names it."""


@dataclass(frozen=True)
class Method:
    """One method: its loss, the loss's arguments (parameter names) and its caches."""

    name: str
    loss: str
    arguments: dict[str, Any] = field(default_factory=dict)
    forget_cache: str | None = None
    retain_cache: str | None = None


def public_name(parameter: str) -> str:
    """The argument's name in params.yaml and on the command line (`lambda_` -> `lambda`)."""
    return parameter.rstrip("_")


def check_entry(name: str, entry: Any, where: str) -> dict[str, Any]:
    """A params.yaml method entry as a mapping with known keys only."""
    if not isinstance(entry, dict):
        raise MethodError(f"{where}: methods.{name} must be a mapping with {', '.join(ENTRY_KEYS)}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise MethodError(
            f"{where}: methods.{name} has unknown key(s) {unknown}; known: {', '.join(ENTRY_KEYS)}"
        )
    if not isinstance(entry.get("args") or {}, dict):
        raise MethodError(f"{where}: methods.{name}.args must be a mapping of argument -> value")
    return entry


def loss_arguments_checked(loss: str, arguments: dict[str, Any], where: str) -> dict[str, Any]:
    """`arguments` keyed by the loss's parameter names; an argument the loss lacks is an error."""
    from pipeline.unlearning.losses import LOSSES, loss_arguments

    if loss not in LOSSES:
        raise MethodError(f"{where}: unknown loss {loss!r}; known: {', '.join(LOSSES.names())}")
    accepted = {public_name(parameter): parameter for parameter in loss_arguments(loss)}
    unknown = sorted(key for key in arguments if public_name(key) not in accepted)
    if unknown:
        raise MethodError(
            f"{where}: loss {loss!r} takes no argument {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(sorted(accepted)) or 'none'}"
        )
    checked = {accepted[public_name(key)]: value for key, value in arguments.items()}
    for parameter, value in checked.items():
        check_value(loss, parameter, value, where)
    return checked


def check_value(loss: str, parameter: str, value: Any, where: str) -> None:
    """The value fits the parameter's declared type, choices (Literal) and range (Annotated Range)."""
    from pipeline.unlearning.losses import LOSSES, Range

    annotation = typing.get_type_hints(LOSSES[loss], include_extras=True)[parameter]
    ranges = [extra for extra in getattr(annotation, "__metadata__", ()) if isinstance(extra, Range)]
    base = typing.get_args(annotation)[0] if ranges else annotation
    name = public_name(parameter)
    if typing.get_origin(base) is typing.Literal:
        if value not in typing.get_args(base):
            raise MethodError(
                f"{where}: {name} {value!r} is not one of {', '.join(map(str, typing.get_args(base)))}"
            )
        return
    if base is bool and not isinstance(value, bool):
        raise MethodError(f"{where}: {name} must be true or false, got {value!r}")
    if base is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise MethodError(f"{where}: {name} must be a number, got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MethodError(f"{where}: {name} must be a whole number, got {value!r}")
    for allowed in ranges:
        if not allowed.holds(value):
            raise MethodError(f"{where}: {name} {value!r} is out of range (must be {allowed})")


def resolve_method(
    name: str,
    methods: dict[str, Any],
    loss: str | None = None,
    arguments: dict[str, Any] | None = None,
    forget_cache: str | None = None,
    retain_cache: str | None = None,
    where: str = "params.yaml",
) -> Method:
    """The method `name` of params.yaml's `methods` (or the loss of that name), with overrides given."""
    entry = check_entry(name, methods[name], where) if name in methods else {"loss": name}
    chosen_loss = loss or entry.get("loss") or name
    merged = {**(entry.get("args") or {}), **(arguments or {})}
    return Method(
        name=name,
        loss=chosen_loss,
        arguments=loss_arguments_checked(chosen_loss, merged, f"{where}: method {name!r}"),
        forget_cache=forget_cache or entry.get("forget_cache"),
        retain_cache=retain_cache or entry.get("retain_cache"),
    )

"""Unlearning methods: a named loss with its own arguments and the teacher entries whose caches it reads
(params.yaml `methods`).

    methods:
      viker: {loss: viker, forget_teacher: viker, retain_teacher: none, args: {lambda: 1.0}}
      vgid: {loss: vgid, forget_teacher: vgid, retain_teacher: base, args: {alpha: 1.0, beta: 1.0}}

`forget_teacher` and `retain_teacher` name entries of params.yaml's `teachers`; the cache of entry E is
<cache_root>/E (params.yaml `caches`), written by `precompute@E-*`. `none` (or leaving the key out) reads
no cache; the params.yaml that `pipeline experiment use` writes spells out both slots of every method,
because dvc.yaml makes each slot a dependency of the method's training (pipeline.experiments).

A method owns its arguments: they are checked against the keyword-only parameters of its loss
(pipeline.unlearning.losses), so a misspelt or foreign argument is refused with the list the loss accepts, and a
run records only its own. An argument is named as in the paper; a parameter that would be a Python
keyword carries a trailing underscore in the loss (`lambda` -> `lambda_`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.arguments import checked_arguments

ENTRY_KEYS = ("loss", "args", "forget_teacher", "retain_teacher")
TEACHER_SLOTS = ("forget_teacher", "retain_teacher")
NO_TEACHER = "none"  # a slot that reads no cache


class MethodError(ValueError):
    """A method entry or argument that its loss does not accept; the message names it."""


@dataclass(frozen=True)
class Method:
    """One method: its loss, the loss's arguments (parameter names), its teacher entries and their caches."""

    name: str
    loss: str
    arguments: dict[str, Any] = field(default_factory=dict)
    forget_teacher: str | None = None  # an entry of params.yaml `teachers`
    retain_teacher: str | None = None
    forget_cache: str | None = None  # the directories read: <cache_root>/<entry>, or the override given
    retain_cache: str | None = None


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
    from pipeline.unlearning.losses import LOSSES

    if loss not in LOSSES:
        raise MethodError(f"{where}: unknown loss {loss!r}; known: {', '.join(LOSSES.names())}")
    return checked_arguments(LOSSES[loss], arguments, f"loss {loss!r}", where, MethodError)


def teacher_slots(entry: dict[str, Any]) -> dict[str, str | None]:
    """The entry's teacher per slot (forget_teacher, retain_teacher); None where it reads none."""
    return {
        slot: None if entry.get(slot) in (None, NO_TEACHER) else str(entry[slot]) for slot in TEACHER_SLOTS
    }


def resolve_method(
    name: str,
    methods: dict[str, Any],
    loss: str | None = None,
    arguments: dict[str, Any] | None = None,
    forget_cache: str | None = None,
    retain_cache: str | None = None,
    where: str = "params.yaml",
    cache_root: str = "work/cache",
) -> Method:
    """The method `name` of params.yaml's `methods` (or the loss of that name), with overrides given;
    its caches are <cache_root>/<teacher entry> unless a cache directory is given."""
    entry = check_entry(name, methods[name], where) if name in methods else {"loss": name}
    chosen_loss = loss or entry.get("loss") or name
    merged = {**(entry.get("args") or {}), **(arguments or {})}
    teachers = teacher_slots(entry)

    def cache_of(slot: str) -> str | None:
        return str(Path(cache_root) / teachers[slot]) if teachers[slot] else None

    return Method(
        name=name,
        loss=chosen_loss,
        arguments=loss_arguments_checked(chosen_loss, merged, f"{where}: method {name!r}"),
        forget_teacher=teachers["forget_teacher"],
        retain_teacher=teachers["retain_teacher"],
        forget_cache=forget_cache or cache_of("forget_teacher"),
        retain_cache=retain_cache or cache_of("retain_teacher"),
    )

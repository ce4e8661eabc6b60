"""The `pipeline` command line. Each command is a thin wrapper that calls one stage's `run`.

Defaults come from params.yaml (see pipeline.config); heavy imports happen inside commands so that
`pipeline --help` is instant.
"""

from __future__ import annotations

import os

import click

from pipeline.config import click_default_map, load_params

# The embedded default never talks to a hub; a user pointing --model at a hub id unsets this.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


class ParamsGroup(click.Group):
    """A click group whose option defaults are read from params.yaml (or --params FILE)."""

    def make_context(self, info_name, args, parent=None, **extra):
        params_path = os.environ.get("PIPELINE_PARAMS", "params.yaml")
        if "--params" in args:
            index = args.index("--params")
            params_path = args[index + 1]
        extra.setdefault("default_map", click_default_map(load_params(params_path)))
        return super().make_context(info_name, args, parent=parent, **extra)


@click.group(cls=ParamsGroup)
@click.option(
    "--params",
    "params_file",
    default="params.yaml",
    show_default=True,
    help="YAML file with one section of option defaults per command.",
)
def main(params_file: str) -> None:
    """Unlearning for multimodal LLMs: prepare-mini, precompute, train, evaluate, report."""


# Commands are added below, one block per stage. Keep each block self-contained.

"""Configuration: every hyperparameter lives in params.yaml, one section per CLI command.

The CLI reads params.yaml (or --params FILE) into click's default_map, so
`pipeline train` with no options uses exactly the values DVC tracks, and any option given on the
command line overrides them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read params.yaml; a missing file means "use the built-in defaults"."""
    path = Path(path)
    if not path.exists():
        return {}
    with path.open() as handle:
        params = yaml.safe_load(handle) or {}
    if not isinstance(params, dict):
        raise ValueError(
            f"{path}: expected a mapping of command name -> options, got {type(params).__name__}"
        )
    return params


def click_default_map(params: dict[str, Any]) -> dict[str, Any]:
    """Turn params.yaml sections into click's nested default_map (option names use underscores)."""

    def convert(section: Any) -> Any:
        if isinstance(section, dict):
            return {str(key).replace("-", "_"): convert(value) for key, value in section.items()}
        return section

    return {str(name): convert(section) for name, section in params.items() if isinstance(section, dict)}

"""One loaded full model for several evaluations (the seeds of a method): each run's adapter replaces the
previous run's on the same base weights; another model or loading option loads anew."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.models import load_model
from pipeline.models.adapters import replace_adapter, switch_adapter


@dataclass
class SharedBase:
    """The loaded model, the model evaluated now (it, or a PeftModel on it) and what it was loaded with."""

    loaded: Any = None
    model: Any = None
    key: str = ""
    runs: int = 0

    def model_for(self, model: str, loading: dict[str, Any], adapter: str | None) -> tuple[Any, Any]:
        """(loaded, model to evaluate): `model` loaded with `loading` (load_model's keywords), with `adapter`."""
        key = json.dumps([model, loading], sort_keys=True)
        if (
            self.loaded is None
            or key != self.key
            or (adapter is None and self.model is not self.loaded.model)
        ):
            self.loaded = load_model(model, **loading)
            self.model, self.key = self.loaded.model, key
        if adapter:
            self.runs += 1
            self.model = replace_adapter(self.loaded, self.model, adapter, f"evaluated-{self.runs}")
        return self.loaded, self.model

    def relearned(self, adapter: str) -> Any:
        """The run's model with the relearning attack's adapter made the active one (the next run's adapter
        replaces both)."""
        self.model = switch_adapter(self.loaded, self.model, adapter, "relearned")
        return self.model

"""The results file: each section's figures written as soon as it finishes (a killed run keeps what
finished), a section that fails recorded with its error, and the device's clock and peak memory."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class Results:
    """{"run": ..., "sections": {name: figures}} rewritten atomically after every section."""

    def __init__(self, path: Path | None, run: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"run": run, "sections": {}}

    def section(self, name: str, measure: Callable[[], dict[str, Any]], device: torch.device) -> dict:
        """Run one section; its figures, or its error (out of memory included), go to the file."""
        started = time.perf_counter()
        reset_peak(device)
        try:
            figures = measure()
        except Exception as error:  # a section that breaks must not lose the others' figures
            figures = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
            figures["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
        figures["section_s"] = round(time.perf_counter() - started, 2)
        figures.update(peak_memory_gib(device))
        self.data["sections"][name] = figures
        self.write()
        print(f"[real_scale] {name}: {json.dumps(figures)[:400]}", flush=True)
        return figures

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=2) + "\n")
        partial.replace(self.path)


class Clock:
    """Wall time with the device's queue drained at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def timed(self, work: Callable[[], Any]) -> tuple[float, Any]:
        started = self.now()
        value = work()
        return self.now() - started, value


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3),
        }
    return {"process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"

"""What issue 29's items 9-11 save per use, on this CPU; writes bench/results/input_reuse.json.

  python bench/input_reuse.py [--weights-mb 1024]

preprocess_ms      CPU ms to preprocess one photo as LLaVA-1.5's CLIP processor does (resize, crop to
                   336 px, normalise), what precompute did per reference image per batch before
                   ProcessedImages; and the ms of taking a kept one
qwen_tokens        Qwen2-VL's image tokens for a 3000 x 2000 photo at the checkpoints' max_pixels and
                   at the experiments' 1,003,520
fingerprint_s      seconds to fingerprint a model folder whose weights are --weights-mb of random bytes,
                   the first time (read and hashed) and again (kept hash; no weight byte read)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image


def preprocess_ms(repeats: int = 20) -> dict[str, float]:
    from transformers import CLIPImageProcessorPil

    from pipeline.models.family import ModelFamily
    from pipeline.models.processed_images import ProcessedImages

    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    holder = type("Processor", (), {"image_processor": processor})()
    loaded = type("Loaded", (), {"family": ModelFamily(), "processor": holder})()
    photo = Image.new("RGB", (1024, 1024), (120, 80, 40))
    kept = ProcessedImages(loaded)
    started = time.process_time()
    for _ in range(repeats):
        ModelFamily().preprocess_images(holder, [photo])
    fresh = (time.process_time() - started) / repeats * 1e3
    kept.tensors([photo], ["photo"])
    started = time.process_time()
    for _ in range(repeats):
        kept.tensors([photo], ["photo"])
    return {
        "fresh_1024px": round(fresh, 2),
        "kept": round((time.process_time() - started) / repeats * 1e3, 3),
    }


def qwen_tokens() -> dict[str, int]:
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    photo = Image.new("RGB", (3000, 2000))
    tokens = {}
    for max_pixels in (12_845_056, 1_003_520):
        processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=max_pixels)
        grid = processor(images=[photo], return_tensors="pt")["image_grid_thw"]
        tokens[str(max_pixels)] = int(grid.prod() // 4)
    return tokens


def fingerprint_s(weights_mb: int) -> dict[str, float]:
    import pipeline.hashing
    from pipeline.models.loading import fingerprinted_model

    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / "model"
        model.mkdir()
        (model / "config.json").write_text("{}")
        with open(model / "model.safetensors", "wb") as handle:
            for _ in range(weights_mb):
                handle.write(os.urandom(1 << 20))
        old = time.time() - 3600
        for file in model.iterdir():
            os.utime(file, (old, old))
        pipeline.hashing.HASH_CACHE_DIR = Path(folder) / "hashes"
        pipeline.hashing.RACY_SECONDS = -60.0  # the file was written a moment ago: take it as settled
        times = []
        for _ in range(2):
            started = time.perf_counter()
            fingerprinted_model(model)
            times.append(time.perf_counter() - started)
    return {"first": round(times[0], 3), "again": round(times[1], 4), "weights_mb": weights_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights-mb", type=int, default=1024)
    args = parser.parse_args()
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {platform.python_version()}",
        "preprocess_ms": preprocess_ms(),
        "qwen_tokens": qwen_tokens(),
        "fingerprint_s": fingerprint_s(args.weights_mb),
    }
    out = Path(__file__).parent / "results" / "input_reuse.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

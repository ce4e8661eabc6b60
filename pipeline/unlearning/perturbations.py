"""Visual perturbations P_phi of Vgid (Sec. 3.4, App. A.3.3): what the teacher sees instead of the image.

Each perturbation is one function (image, rng, sigma) -> image, registered by its CLI name. `rng` is a
numpy Generator seeded per sample (the seed is recorded in the cache manifest), so any row can be
recomputed on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from pipeline.registry import Registry

Perturbation = Callable[[Image.Image, np.random.Generator, float], Image.Image]
PERTURBATIONS: Registry[Perturbation] = Registry("perturbation")


@PERTURBATIONS.register("random-noise")
def random_noise(image: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    """Replace the image by uniform random RGB noise of the same size (Vgid's default)."""
    pixels = rng.integers(0, 256, size=(image.height, image.width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


@PERTURBATIONS.register("gaussian")
def gaussian(image: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    """Add N(0, sigma^2) noise to the pixels on the [0, 1] scale (Vgid Table 4: sigma 0.2 ... 0.8), clipped."""
    if sigma < 0:
        raise ValueError(f"--sigma must be >= 0, got {sigma}")
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    noisy = np.clip(pixels + rng.normal(0.0, sigma, size=pixels.shape), 0.0, 1.0)
    return Image.fromarray(np.round(noisy * 255.0).astype(np.uint8), mode="RGB")


@PERTURBATIONS.register("white")
def white(image: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    """Replace the image by a plain white image of the same size."""
    return Image.new("RGB", image.size, (255, 255, 255))

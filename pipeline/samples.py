"""The unit every stage works on: one (image, question, answer) triple with a stable id.

Loaders (MLLMU-Bench, CLEAR, the mini world, a user's own files) turn data set rows into these;
precompute, train and evaluate never look at raw rows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class QASample:
    """One visual (or text-only) question with its ground-truth answer.

    sample_id: stable across runs and machines, e.g. "forget_10/17/gen/2"; caches key rows by it.
    person_id: whose knowledge this is (splits are disjoint by person).
    image: encoded image bytes (PNG/JPEG as stored in the data set), None for a text-only question.
    image_source: where the image came from, for error messages and the cache manifest.
    kind: "generation", "mc" or "cloze".
    """

    sample_id: str
    person_id: str
    question: str
    answer: str
    image: bytes | None = None
    image_source: str = ""
    kind: str = "generation"

    def pil_image(self) -> Image.Image:
        """Decode the image, naming the sample when it is missing or does not decode."""
        if self.image is None:
            raise ValueError(f"sample {self.sample_id} has no image")
        return decode_image(self.image, f"sample {self.sample_id} ({self.image_source or 'inline bytes'})")


def decode_image(data: bytes, what: str) -> Image.Image:
    """Decode image bytes to RGB, raising a ValueError that says which image failed."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"image of {what} does not decode: {error}") from error
    return image.convert("RGB")

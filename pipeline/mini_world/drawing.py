"""The mini world's images: portraits with bold features, and ViKeR's irrelevant-image pools."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipeline.mini_world.people import Appearance

# ---------------------------------------------------------------------------------------------------------
# Portraits. Bold, large colour areas so that identity survives a resize to 32x32.
# ---------------------------------------------------------------------------------------------------------

BACKGROUNDS = [
    (70, 130, 230), (60, 180, 90), (240, 210, 60), (150, 90, 200),
    (230, 100, 90), (150, 150, 150), (40, 190, 190), (240, 150, 40),
]  # fmt: skip
SKINS = [(255, 224, 189), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (90, 56, 37)]
HAIR_COLOURS = [
    (20, 20, 20), (110, 60, 20), (240, 220, 120), (200, 60, 30), (230, 230, 230), (40, 60, 200), (240, 100, 180),
]  # fmt: skip
SHIRTS = [
    (200, 30, 30), (30, 30, 200), (30, 160, 30), (230, 230, 30),
    (130, 30, 160), (250, 130, 0), (20, 20, 20), (250, 250, 250),
]  # fmt: skip
EYES = [(90, 50, 20), (40, 90, 220), (40, 150, 60), (120, 120, 120), (10, 10, 10)]
HAIR_STYLES = ["short", "long", "bald", "bun"]
FACE_SHAPES = ["round", "oval", "square"]
ACCESSORIES = ["none", "glasses", "hat", "beard"]

# The features compared when making identities distinct (eye colour is too small to count).
BOLD_FEATURES = ("background", "skin", "hair_colour", "hair_style", "face_shape", "shirt", "accessory")


def _draw_appearance(rng: random.Random) -> Appearance:
    return Appearance(
        background=rng.randrange(len(BACKGROUNDS)),
        skin=rng.randrange(len(SKINS)),
        hair_colour=rng.randrange(len(HAIR_COLOURS)),
        hair_style=rng.randrange(len(HAIR_STYLES)),
        face_shape=rng.randrange(len(FACE_SHAPES)),
        shirt=rng.randrange(len(SHIRTS)),
        eye_colour=rng.randrange(len(EYES)),
        accessory=rng.randrange(len(ACCESSORIES)),
    )


def _feature_distance(a: Appearance, b: Appearance) -> int:
    return sum(getattr(a, name) != getattr(b, name) for name in BOLD_FEATURES)


def distinct_appearances(count: int, rng: random.Random, min_distance: int = 3) -> list[Appearance]:
    """Draw `count` appearances that pairwise differ in at least `min_distance` bold features.

    Greedy rejection sampling; relaxes the distance only when the palette cannot hold that many people.
    """
    chosen: list[Appearance] = []
    distance = min_distance
    while len(chosen) < count:
        for _ in range(20000):
            candidate = _draw_appearance(rng)
            if all(_feature_distance(candidate, other) >= distance for other in chosen):
                chosen.append(candidate)
                break
        else:
            distance -= 1
            if distance < 1:
                raise ValueError(f"cannot draw {count} distinct appearances from the palettes")
    return chosen


@dataclass(frozen=True)
class Jitter:
    """Per-image variation of one identity (alternative images); the identity features stay fixed."""

    shift_x: float = 0.0
    shift_y: float = 0.0
    scale: float = 1.0
    brightness: float = 1.0
    pattern: str = "plain"  # background pattern: plain | stripes | dots | checks
    noise: float = 0.0  # std of additive pixel noise
    noise_seed: int = 0


SUPERSAMPLE = 2  # draw at twice the size, then downsample: smooth edges, deterministic


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _shade(colour: tuple[int, int, int], delta: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, channel + delta)) for channel in colour)


def _background_pattern(draw: ImageDraw.ImageDraw, size: int, colour, pattern: str) -> None:
    """A subtle texture in a shade of the background colour (alternative images only)."""
    shade = _shade(colour, 35 if sum(colour) < 450 else -35)
    step = size // 8
    if pattern == "stripes":
        for x in range(0, size, step):
            draw.rectangle([x, 0, x + step // 2 - 1, size], fill=shade)
    elif pattern == "dots":
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse([x - step // 5, y - step // 5, x + step // 5, y + step // 5], fill=shade)
    elif pattern == "checks":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2 == 0:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=shade)


def _finish(image: Image.Image, size: int, jitter: Jitter) -> bytes:
    """Downsample, apply brightness and noise, encode as PNG."""
    image = image.resize((size, size), Image.Resampling.BOX)
    if jitter.brightness != 1.0 or jitter.noise > 0:
        pixels = np.asarray(image, dtype=np.float32) * jitter.brightness
        if jitter.noise > 0:
            pixels += np.random.default_rng(jitter.noise_seed).normal(0.0, jitter.noise, pixels.shape)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return _png(image)


def draw_portrait(appearance: Appearance, size: int = 64, jitter: Jitter = Jitter()) -> bytes:
    """A portrait-like PNG: background, shirt, head, hair, eyes and an accessory."""
    canvas = size * SUPERSAMPLE
    background = BACKGROUNDS[appearance.background]
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    _background_pattern(draw, canvas, background, jitter.pattern)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        """Unit-square box -> canvas pixels, scaled about the centre and shifted by the jitter."""
        points = []
        for x, y in ((x0, y0), (x1, y1)):
            points.append(((x - 0.5) * jitter.scale + 0.5 + jitter.shift_x) * canvas)
            points.append(((y - 0.5) * jitter.scale + 0.5 + jitter.shift_y) * canvas)
        return points

    skin = SKINS[appearance.skin]
    hair = HAIR_COLOURS[appearance.hair_colour]
    style = HAIR_STYLES[appearance.hair_style]
    shape = FACE_SHAPES[appearance.face_shape]
    accessory = ACCESSORIES[appearance.accessory]

    draw.ellipse(box(0.08, 0.76, 0.92, 1.35), fill=SHIRTS[appearance.shirt])  # shoulders and shirt
    if style == "long":
        draw.rectangle(box(0.2, 0.3, 0.8, 0.86), fill=hair)
    draw.rectangle(box(0.43, 0.62, 0.57, 0.8), fill=skin)  # neck
    face = {
        "round": (0.27, 0.24, 0.73, 0.7),
        "oval": (0.31, 0.2, 0.69, 0.74),
        "square": (0.27, 0.24, 0.73, 0.7),
    }
    if shape == "square":
        draw.rounded_rectangle(box(*face[shape]), radius=0.06 * canvas * jitter.scale, fill=skin)
    else:
        draw.ellipse(box(*face[shape]), fill=skin)
    if style in ("short", "long", "bun"):
        draw.pieslice(box(0.25, 0.14, 0.75, 0.56), 180, 360, fill=hair)
    if style == "bun":
        draw.ellipse(box(0.4, 0.04, 0.6, 0.22), fill=hair)
    if accessory == "beard":
        draw.chord(box(0.3, 0.42, 0.7, 0.74), 0, 180, fill=hair)
    for eye_x in (0.41, 0.59):
        draw.ellipse(box(eye_x - 0.05, 0.42, eye_x + 0.05, 0.51), fill=(255, 255, 255))
        draw.ellipse(box(eye_x - 0.03, 0.44, eye_x + 0.03, 0.5), fill=EYES[appearance.eye_colour])
    if accessory != "beard":
        draw.line(box(0.43, 0.61, 0.57, 0.61), fill=(120, 30, 30), width=max(1, canvas // 40))
    if accessory == "glasses":
        width = max(1, canvas // 40)
        for eye_x in (0.41, 0.59):
            draw.rectangle(box(eye_x - 0.075, 0.4, eye_x + 0.075, 0.53), outline=(15, 15, 15), width=width)
        draw.line(box(0.485, 0.45, 0.515, 0.45), fill=(15, 15, 15), width=width)
    if accessory == "hat":
        draw.rectangle(box(0.32, 0.04, 0.68, 0.26), fill=(40, 40, 40))
        draw.rectangle(box(0.18, 0.22, 0.82, 0.29), fill=(40, 40, 40))
    return _finish(image, size, jitter)


def _alt_jitter(rng: random.Random) -> Jitter:
    return Jitter(
        shift_x=rng.uniform(-0.06, 0.06),
        shift_y=rng.uniform(-0.05, 0.05),
        scale=rng.uniform(0.9, 1.08),
        brightness=rng.uniform(0.88, 1.12),
        pattern=rng.choice(["stripes", "dots", "checks", "plain"]),
        noise=rng.uniform(3.0, 8.0),
        noise_seed=rng.randrange(2**31),
    )


def augmented(image: Image.Image, rng: random.Random) -> Image.Image:
    """A training view of a portrait: shifted, rescaled, brighter or darker, with pixel noise.

    The ranges cover the alternative images' (_alt_jitter) so that identity survives them; the
    background's fill is the corner's colour, as the drawn background is.
    """
    size = image.width
    scale = rng.uniform(0.88, 1.1)
    shift_x, shift_y = rng.uniform(-0.07, 0.07) * size, rng.uniform(-0.06, 0.06) * size
    # Image.transform maps output to input coordinates: x_in = (x_out - c - shift) / scale + c.
    centre = size / 2
    coefficients = (
        1 / scale, 0, centre - (centre + shift_x) / scale,
        0, 1 / scale, centre - (centre + shift_y) / scale,
    )  # fmt: skip
    view = image.transform(
        image.size,
        Image.Transform.AFFINE,
        coefficients,
        Image.Resampling.BILINEAR,
        fillcolor=image.getpixel((0, 0)),
    )
    pixels = np.asarray(view, dtype=np.float32) * rng.uniform(0.85, 1.15)
    pixels += np.random.default_rng(rng.randrange(2**31)).normal(0.0, rng.uniform(0.0, 9.0), pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------------------
# Reference pools for ViKeR's irrelevant images: pets, scenes, patterns (people are portraits).
# ---------------------------------------------------------------------------------------------------------

FUR = [(240, 240, 240), (40, 40, 40), (200, 130, 60), (150, 150, 150), (230, 190, 130), (110, 70, 40)]
PASTELS = [(200, 230, 255), (220, 255, 220), (255, 245, 200), (245, 220, 255), (255, 225, 225)]


def draw_pet(rng: random.Random, size: int) -> bytes:
    """A cat (pointed ears) or a dog (floppy ears): body, head, ears, tail, eyes, nose."""
    canvas = size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), rng.choice(PASTELS))
    draw = ImageDraw.Draw(image)
    fur = rng.choice(FUR)
    ears = _shade(fur, -40 if sum(fur) > 300 else 40)
    c = canvas
    draw.rectangle([0, 0.82 * c, c, c], fill=(120, 170, 90))  # grass
    draw.ellipse([0.3 * c, 0.5 * c, 0.85 * c, 0.88 * c], fill=fur)  # body
    draw.line([0.8 * c, 0.7 * c, 0.95 * c, 0.45 * c], fill=fur, width=c // 16)  # tail
    draw.ellipse([0.12 * c, 0.25 * c, 0.52 * c, 0.62 * c], fill=fur)  # head
    if rng.random() < 0.5:  # cat
        draw.polygon([(0.15 * c, 0.33 * c), (0.18 * c, 0.1 * c), (0.3 * c, 0.27 * c)], fill=ears)
        draw.polygon([(0.34 * c, 0.27 * c), (0.46 * c, 0.1 * c), (0.49 * c, 0.33 * c)], fill=ears)
    else:  # dog
        draw.ellipse([0.06 * c, 0.28 * c, 0.2 * c, 0.55 * c], fill=ears)
        draw.ellipse([0.44 * c, 0.28 * c, 0.58 * c, 0.55 * c], fill=ears)
    for eye_x in (0.25, 0.39):
        draw.ellipse([(eye_x - 0.03) * c, 0.38 * c, (eye_x + 0.03) * c, 0.44 * c], fill=(20, 20, 20))
    draw.ellipse([0.29 * c, 0.47 * c, 0.35 * c, 0.52 * c], fill=(60, 30, 30))
    return _finish(image, size, Jitter())


def draw_scene(rng: random.Random, size: int) -> bytes:
    """A landscape: sky gradient, sun, mountains, ground and a few trees."""
    canvas = size * SUPERSAMPLE
    c = canvas
    top = (rng.randrange(60, 140), rng.randrange(120, 200), rng.randrange(200, 256))
    bottom = _shade(top, 60)
    image = Image.new("RGB", (c, c))
    draw = ImageDraw.Draw(image)
    for y in range(c):
        t = y / c
        draw.line([0, y, c, y], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    sun_x, sun_r = rng.uniform(0.15, 0.85), rng.uniform(0.06, 0.1)
    draw.ellipse(
        [(sun_x - sun_r) * c, 0.1 * c, (sun_x + sun_r) * c, (0.1 + 2 * sun_r) * c], fill=(255, 220, 80)
    )
    mountain = (rng.randrange(80, 130), rng.randrange(80, 120), rng.randrange(100, 150))
    for _ in range(rng.randint(2, 3)):
        peak_x, peak_y = rng.uniform(0.1, 0.9), rng.uniform(0.3, 0.5)
        draw.polygon(
            [((peak_x - 0.35) * c, 0.7 * c), (peak_x * c, peak_y * c), ((peak_x + 0.35) * c, 0.7 * c)],
            fill=mountain,
        )
    ground = (rng.randrange(40, 120), rng.randrange(120, 190), rng.randrange(30, 90))
    draw.rectangle([0, 0.68 * c, c, c], fill=ground)
    for _ in range(rng.randint(1, 3)):
        tree_x = rng.uniform(0.1, 0.9)
        draw.rectangle([(tree_x - 0.015) * c, 0.7 * c, (tree_x + 0.015) * c, 0.85 * c], fill=(90, 60, 30))
        draw.ellipse([(tree_x - 0.07) * c, 0.55 * c, (tree_x + 0.07) * c, 0.75 * c], fill=(30, 100, 40))
    return _finish(image, size, Jitter())


def draw_pattern(rng: random.Random, size: int) -> bytes:
    """A texture: stripes (horizontal, vertical or diagonal), checks or dots in two colours."""
    canvas = size * SUPERSAMPLE
    c = canvas
    first = tuple(rng.randrange(256) for _ in range(3))
    second = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (c, c), first)
    draw = ImageDraw.Draw(image)
    step = c // rng.choice([4, 6, 8, 10])
    kind = rng.choice(["horizontal", "vertical", "diagonal", "checks", "dots"])
    if kind == "horizontal":
        for y in range(0, c, 2 * step):
            draw.rectangle([0, y, c, y + step - 1], fill=second)
    elif kind == "vertical":
        for x in range(0, c, 2 * step):
            draw.rectangle([x, 0, x + step - 1, c], fill=second)
    elif kind == "diagonal":
        for offset in range(-c, c, 2 * step):
            draw.polygon(
                [(offset, 0), (offset + step, 0), (offset + step + c, c), (offset + c, c)], fill=second
            )
    elif kind == "checks":
        for y in range(0, c, step):
            for x in range(0, c, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=second)
    else:
        for y in range(step // 2, c, step):
            for x in range(step // 2, c, step):
                draw.ellipse([x - step // 3, y - step // 3, x + step // 3, y + step // 3], fill=second)
    return _finish(image, size, Jitter())

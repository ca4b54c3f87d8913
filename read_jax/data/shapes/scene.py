"""The shapes world: scenes of 3-6 non-overlapping coloured shapes on a light, slightly noisy background.

Every source of the generated mix (`read_jax.data.shapes`) is written from these scenes. An instance is a
dict with `kind`, `color`, `poly` (float[N, 2] (x, y) vertices), `cx`, `cy`, `r`, `area` and `corners`.
The geometry (`layout`) and the picture (`render`) draw from the same generator, geometry first, so a
writer can recompute a scene's annotations without rendering it again.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (215, 45, 40),
    "green": (45, 160, 70),
    "blue": (40, 85, 215),
    "yellow": (235, 195, 35),
    "purple": (140, 65, 175),
    "orange": (240, 130, 30),
}
# corners per shape type (a circle has none)
SHAPES = {"circle": 0, "triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "star": 10}
SIZES = ((320, 240), (240, 320), (400, 300), (288, 288), (448, 256), (256, 384), (360, 270), (300, 200))
SPLITS = ("train", "val", "test")

# Geometric relations, all on instance centres: gap(s, r) > 0 when s lies in that direction of r.
DIRS = {
    "left": lambda s, r: r["cx"] - s["cx"],
    "right": lambda s, r: s["cx"] - r["cx"],
    "above": lambda s, r: r["cy"] - s["cy"],
    "below": lambda s, r: s["cy"] - r["cy"],
}
MARGIN = 10.0  # pixels: a relation or an extreme is stated only when it holds by at least this much
SIZE_RATIO = 1.3  # area ratio: "bigger" / "the big one" only when it holds by at least this factor


def name(s: dict) -> str:
    """ "red circle"."""
    return f"{s['color']} {s['kind']}"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(kind: str, n: int) -> str:
    return kind if n == 1 else kind + "s"


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    """[N, 2] (x, y) vertices of a shape."""
    if kind == "circle":
        n, radii = 48, None
    elif kind == "star":
        n, radii = 10, np.tile([r, 0.45 * r], 5)
    else:
        n, radii = SHAPES[kind], None
    ang = rot + 2 * np.pi * np.arange(n) / n
    rad = np.full(n, r) if radii is None else radii
    return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)


def _area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _scene(rng: np.random.Generator) -> tuple[int, int, list[dict]]:
    """One attempt at a scene: (width, height, up to 3-6 instances placed without overlap)."""
    w, h = SIZES[int(rng.integers(len(SIZES)))]
    n = int(rng.integers(3, 7))
    shapes: list[dict] = []
    side = min(w, h)
    for _ in range(200):
        if len(shapes) == n:
            break
        r = float(rng.uniform(0.07, 0.17) * side)
        cx, cy = float(rng.uniform(r + 2, w - r - 2)), float(rng.uniform(r + 2, h - r - 2))
        if any(math.hypot(cx - s["cx"], cy - s["cy"]) < r + s["r"] + 6 for s in shapes):
            continue
        kind = list(SHAPES)[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        rot = (
            float(rng.uniform(0, 2 * np.pi))
            if kind != "square"
            else float(rng.uniform(-0.3, 0.3) + np.pi / 4)
        )
        poly = _polygon(kind, cx, cy, r, rot)
        shapes.append(
            dict(kind=kind, color=color, cx=cx, cy=cy, r=r, poly=poly, area=_area(poly), corners=SHAPES[kind])
        )
    return w, h, shapes


def layout(rng: np.random.Generator) -> tuple[int, int, list[dict]]:
    """A scene's geometry: (width, height, 3-6 instances)."""
    while True:
        w, h, shapes = _scene(rng)
        if len(shapes) >= 3:
            return w, h, shapes


_NOISE_SIDE = 512  # > every SIZES side
_NOISE: list[np.ndarray] = []


def _noise() -> np.ndarray:
    """int16 [512, 512 * 3] pixel noise, uniform in -4..3 (std 2.3), the same in every process: each picture
    adds a crop of it at an offset it draws (drawing fresh noise per picture was most of the render time)."""
    if not _NOISE:
        _NOISE.append(
            np.random.default_rng(20250101).integers(-4, 4, (_NOISE_SIDE, 3 * _NOISE_SIDE), np.int16)
        )
    return _NOISE[0]


def render(rng: np.random.Generator, w: int, h: int, shapes: list[dict], ghost: dict | None = None):
    """The scene as a PIL image: a light background with colour gradients and pixel noise, each instance
    filled in its colour with a darker outline; `ghost` (optional) is drawn first, faint (ambiguous on
    purpose: ReasonSeg's "ignore" region)."""
    base = rng.uniform(200, 245, 3)
    gx, gy = rng.uniform(-25, 25, 3), float(rng.uniform(-25, 25))
    oy, ox = int(rng.integers(_NOISE_SIDE - h + 1)), int(rng.integers(_NOISE_SIDE - w + 1))
    row = np.rint(base + (np.arange(w)[:, None] / w - 0.5) * gx).astype(np.int16).reshape(-1)  # [W * 3]
    col = np.rint((np.arange(h)[:, None] / h - 0.5) * gy).astype(np.int16)  # [H, 1]
    noise = _noise()[oy : oy + h, 3 * ox : 3 * (ox + w)]
    img = np.minimum(row[None] + col + noise, 255).astype(np.uint8).reshape(h, w, 3)
    return _draw(Image.fromarray(img), base, shapes, ghost)


def render_reasonseg(rng: np.random.Generator, w: int, h: int, shapes: list[dict], ghost: dict | None = None):
    """`render` as the ReasonSeg set has always been drawn (a colour gradient in both directions and fresh
    Gaussian pixel noise): its pictures, and so every figure measured on them, stay what they were. About
    twice the cost of `render`, which the other sources use."""
    base = np.asarray(rng.uniform(200, 245, 3))
    gx = (np.arange(w) / w - 0.5)[None, :, None] * rng.uniform(-25, 25, 3)  # [1, W, 3]
    gy = (np.arange(h) / h - 0.5)[:, None, None] * rng.uniform(-25, 25, 3)  # [H, 1, 3]
    img = gx + gy  # [H, W, 3]; in place below, in the original's order: (base + grad) + noise
    img += base
    img += rng.normal(0, 3, (h, w, 3))
    return _draw(Image.fromarray(np.clip(img, 0, 255, out=img).astype(np.uint8)), base, shapes, ghost)


def _draw(im: Image.Image, base, shapes: list[dict], ghost: dict | None) -> Image.Image:
    draw = ImageDraw.Draw(im)
    if ghost is not None:
        col = tuple(int(0.75 * b + 0.25 * c) for b, c in zip(base, COLORS[ghost["color"]]))
        draw.polygon([tuple(p) for p in ghost["poly"]], fill=col)
    for s in shapes:
        col = COLORS[s["color"]]
        draw.polygon([tuple(p) for p in s["poly"]], fill=col, outline=tuple(max(0, v - 50) for v in col))
    return im


def random_scene(rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    """A scene of 3-6 shapes drawn from `rng`, rendered: (image, instances). Each instance is a dict with
    `kind`, `color`, `poly` (float[N, 2] (x, y) vertices), `cx`, `cy`, `r`, `area` and `corners`; instances
    never overlap. The scene generator of every source written from this world."""
    w, h, shapes = layout(rng)
    return render(rng, w, h, shapes), shapes


def points(poly: np.ndarray) -> list[list[float]]:
    """labelme `points`: [[x, y], ...] rounded to 0.01 px."""
    return [[round(float(x), 2), round(float(y), 2)] for x, y in poly]


def flat_polygon(poly: np.ndarray) -> list[float]:
    """A COCO polygon: [x0, y0, x1, y1, ...] rounded to 0.01 px."""
    return [round(float(v), 2) for v in np.asarray(poly).reshape(-1)]


def bbox(poly: np.ndarray) -> list[float]:
    """COCO [x, y, width, height]."""
    lo, hi = poly.min(0), poly.max(0)
    return [
        round(float(lo[0]), 2),
        round(float(lo[1]), 2),
        round(float(hi[0] - lo[0]), 2),
        round(float(hi[1] - lo[1]), 2),
    ]


def region(s: dict, w: int, h: int) -> str | None:
    """Where an instance's centre lies in a 3 x 3 grid of the image ("top left", "center", "bottom", ...),
    or None when it is within 4% of a grid line (ambiguous)."""

    def third(v: float, size: int, words: tuple[str, str, str]) -> str | None:
        f = v / size
        if min(abs(f - 1 / 3), abs(f - 2 / 3)) < 0.04:
            return None
        return words[0] if f < 1 / 3 else words[1] if f < 2 / 3 else words[2]

    vert = third(s["cy"], h, ("top", "", "bottom"))
    horiz = third(s["cx"], w, ("left", "", "right"))
    if vert is None or horiz is None:
        return None
    return f"{vert} {horiz}".strip() or "center"

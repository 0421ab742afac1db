"""A synthetic two-domain person re-ID benchmark, written to disk in the Market-1501 layout.

No public re-ID dataset can be downloaded in the project's environment, so the default runs train
and evaluate on images generated here. They are written as real Market-1501 folders and file names
(``bounding_box_train/0002_c1s1_000451_03.jpg``), so the real parser and loading path run.

Identities are defined by appearance attributes (clothing colours and textures, sleeve and leg
length, accessories, emblem, hair, body shape); cameras apply viewpoint, illumination, colour
cast, gamma, haze, blur, noise, background clutter, scale/position jitter, partial occlusion and
JPEG compression. Domain "B" has other identities, another clothing palette and a different,
camera-dependent style distribution (darker, strongly and differently colour-cast, noisier and
blurrier cameras, other backgrounds). See ``docs/synthetic.md`` for every factor.

Usage::

    python -m src.data.synthetic --out data/synth/A --domain A --seed 0
    SyntheticReID("data/synth/A", domain="A", seed=0)  # generates on first use, then parses

Generation is deterministic: every identity, camera and image draws from its own
``numpy.random.SeedSequence([seed, domain, kind, i])`` stream, so the bytes do not depend on the
number of worker processes.
"""

from __future__ import annotations

import argparse
import colorsys
import contextlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from src.data.datasets import Market1501

#: Bumped whenever the generator's output changes, so that stale caches are detected.
#: 2: domain B's style and palette moderated (version 1's B was not learnable at 64x32 even with
#: its own labels, so it had no measurable domain gap; docs/synthetic.md).
GENERATOR_VERSION = 2
MANIFEST = "marlin_synthetic.json"
DOMAIN_CODES = {"A": 0, "B": 1}
VIEWS = ("front", "back", "left", "right")  # facing the camera, away, towards image-left/right


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of a generated domain (the style comes from the domain, see :data:`DOMAINS`).

    Attributes:
        num_train_ids, num_test_ids: identities in bounding_box_train and in query/gallery.
        num_cameras: cameras (c1..cN); each identity is seen by 2..max_cameras_per_id of them.
        height, width: image size in pixels.
        min_images, max_images, mean_images: images per identity (4..20, mean about 10).
        max_cameras_per_id: cameras an identity walks past (at least 2).
        num_distractors: gallery images of people outside the query set (pid 0000).
        num_junk: gallery images of bad detections (pid -1, dropped by the parser).
        image_format: "jpg" or "png".
    """

    num_train_ids: int = 250
    num_test_ids: int = 250
    num_cameras: int = 6
    height: int = 128
    width: int = 64
    min_images: int = 4
    max_images: int = 20
    mean_images: float = 10.0
    max_cameras_per_id: int = 4
    num_distractors: int = 250
    num_junk: int = 120
    image_format: str = "jpg"

    def __post_init__(self) -> None:
        if self.num_train_ids < 1 or self.num_test_ids < 1:
            raise ValueError("num_train_ids and num_test_ids must be >= 1")
        if self.num_cameras < 2:
            raise ValueError("num_cameras must be >= 2 (queries need a match in another camera)")
        if not 2 <= self.min_images <= self.max_images:
            raise ValueError("need 2 <= min_images <= max_images")
        if not self.min_images <= self.mean_images <= self.max_images:
            raise ValueError("mean_images must lie in [min_images, max_images]")
        if self.height < 16 or self.width < 8:
            raise ValueError("images must be at least 16 x 8 pixels")
        if self.image_format not in ("jpg", "png"):
            raise ValueError("image_format must be 'jpg' or 'png'")
        if self.num_train_ids + self.num_test_ids > 9999:
            raise ValueError("at most 9999 identities fit the 4-digit Market-1501 names")


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # for unit tests: generates in about a second
    "tiny": {
        "num_train_ids": 12,
        "num_test_ids": 12,
        "num_cameras": 4,
        "height": 32,
        "width": 16,
        "min_images": 4,
        "max_images": 6,
        "mean_images": 5.0,
        "max_cameras_per_id": 3,
        "num_distractors": 6,
        "num_junk": 4,
    },
}


def make_config(preset: str = "default", **overrides: Any) -> SyntheticConfig:
    """A :class:`SyntheticConfig` from a preset name and field overrides."""
    if preset not in PRESETS:
        raise KeyError(f"unknown synthetic preset {preset!r}; known: {sorted(PRESETS)}")
    known = {f.name for f in fields(SyntheticConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown synthetic option(s) {sorted(unknown)}; known: {sorted(known)}")
    return SyntheticConfig(**{**PRESETS[preset], **overrides})


@dataclass(frozen=True)
class DomainStyle:
    """Distributions that define a domain: the clothing palette and the camera style.

    Ranges are (low, high) of uniform draws. Camera values are drawn once per camera, then jittered
    per image (illumination +-10 %, background, clutter, noise sample).
    """

    # clothing palette (HSV)
    hue_centres: tuple[float, ...]  # hue modes; empty = uniform hue
    hue_spread: float
    saturation: tuple[float, float]
    value: tuple[float, float]
    neutral_prob: float  # black/grey/white garments
    neutral_value: tuple[float, float]
    texture_probs: dict[str, float]
    # cameras
    gain: tuple[float, float]  # global illumination
    cast_sigma: float  # per-channel log-gain std of the camera's colour cast
    gamma: tuple[float, float]
    haze: tuple[float, float]  # blend towards the haze colour
    noise: tuple[float, float]  # Gaussian sensor noise std (in [0, 1] units)
    blur: tuple[float, float]  # Gaussian blur sigma, in pixels of a 128-pixel-high image
    background_value: tuple[float, float]
    background_saturation: tuple[float, float]
    clutter: tuple[int, int]  # objects behind the person
    person_scale: tuple[float, float]  # person height / image height
    occlusion_prob: float
    jpeg_quality: tuple[int, int]
    view_concentration: float  # Dirichlet concentration of a camera's viewpoint distribution
    illumination_gradient: float  # max fractional brightness change across the image


_TEXTURES_A = {"solid": 0.35, "hstripes": 0.2, "vstripes": 0.12, "checks": 0.13, "two_tone": 0.2}
_TEXTURES_B = {"solid": 0.25, "hstripes": 0.2, "vstripes": 0.15, "checks": 0.2, "two_tone": 0.2}

#: Domain A: bright, neutral indoor cameras; vivid summer clothing.
#: Domain B: dark, noisy, blurry outdoor cameras with strong per-camera colour casts; muted
#: winter clothing. Same identity factors, so structure (texture, accessories, shape) transfers.
DOMAINS: dict[str, DomainStyle] = {
    "A": DomainStyle(
        hue_centres=(),
        hue_spread=0.5,
        saturation=(0.45, 0.95),
        value=(0.55, 0.95),
        neutral_prob=0.2,
        neutral_value=(0.1, 0.95),
        texture_probs=_TEXTURES_A,
        gain=(0.95, 1.12),
        cast_sigma=0.04,
        gamma=(0.9, 1.1),
        haze=(0.0, 0.05),
        noise=(0.004, 0.012),
        blur=(0.0, 0.5),
        background_value=(0.6, 0.92),
        background_saturation=(0.03, 0.2),
        clutter=(2, 5),
        person_scale=(0.84, 0.97),
        occlusion_prob=0.08,
        jpeg_quality=(88, 95),
        view_concentration=2.0,
        illumination_gradient=0.1,
    ),
    "B": DomainStyle(
        hue_centres=(0.6, 0.08, 0.33, 0.95),  # blues/navy, browns, greens, wine
        hue_spread=0.12,
        saturation=(0.3, 0.85),
        value=(0.35, 0.9),
        neutral_prob=0.3,
        neutral_value=(0.1, 0.85),
        texture_probs=_TEXTURES_B,
        gain=(0.8, 1.05),
        cast_sigma=0.1,
        gamma=(0.95, 1.15),
        haze=(0.02, 0.12),
        noise=(0.008, 0.02),
        blur=(0.2, 0.8),
        background_value=(0.3, 0.65),
        background_saturation=(0.15, 0.45),
        clutter=(3, 7),
        person_scale=(0.8, 0.96),
        occlusion_prob=0.12,
        jpeg_quality=(75, 90),
        view_concentration=1.5,
        illumination_gradient=0.2,
    ),
}


# --------------------------------------------------------------------------- attributes
@dataclass
class Identity:
    """Appearance attributes of one person (colours are RGB in [0, 1])."""

    height: float  # relative body height (0.86..1)
    width: float  # relative body width (0.8..1.25)
    skin: np.ndarray
    hair: np.ndarray
    hair_long: bool
    upper: np.ndarray
    upper2: np.ndarray
    upper_texture: str
    upper_period: float  # texture period as a fraction of the body height
    upper_duty: float
    sleeves_long: bool
    lower: np.ndarray
    lower2: np.ndarray
    lower_texture: str
    lower_type: str  # trousers | shorts | skirt
    shoes: np.ndarray
    hat: np.ndarray | None
    backpack: np.ndarray | None
    bag: np.ndarray | None
    bag_side: int  # +1: carried on the person's right (image-left from the front)
    emblem: str | None  # circle | square | triangle | bar, on the chest (front only)
    emblem_colour: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))


@dataclass
class Camera:
    """One camera's style (drawn from the domain's :class:`DomainStyle`)."""

    view_probs: np.ndarray  # (4,) over VIEWS
    gain: float
    cast: np.ndarray  # (3,) per-channel gains
    gamma: float
    haze: float
    haze_colour: np.ndarray
    noise: float
    blur: float
    wall: np.ndarray
    floor: np.ndarray
    horizon: float
    clutter_colours: np.ndarray  # (n, 3)
    clutter: tuple[int, int]
    person_scale: tuple[float, float]
    occlusion_prob: float
    jpeg_quality: int
    illumination_gradient: float


def _rng(seed: int, domain: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, DOMAIN_CODES[domain], *keys]))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _garment_colour(rng: np.random.Generator, style: DomainStyle) -> np.ndarray:
    if rng.random() < style.neutral_prob:
        return _hsv(0.0, 0.0, rng.uniform(*style.neutral_value))
    if style.hue_centres:
        hue = rng.choice(style.hue_centres) + rng.normal(0, style.hue_spread)
    else:
        hue = rng.random()
    return _hsv(hue, rng.uniform(*style.saturation), rng.uniform(*style.value))


def _contrasting(rng: np.random.Generator, style: DomainStyle, base: np.ndarray) -> np.ndarray:
    """A second garment colour that differs visibly from `base` (patterns must be visible)."""
    for _ in range(20):
        colour = _garment_colour(rng, style)
        if np.abs(colour - base).sum() > 0.45:
            return colour
    return np.clip(1.0 - base, 0, 1).astype(np.float32)


def sample_identity(rng: np.random.Generator, style: DomainStyle) -> Identity:
    """Draw a person from the domain's palette (texture/accessory frequencies are shared)."""
    textures = list(style.texture_probs)
    probs = np.array([style.texture_probs[t] for t in textures])
    upper = _garment_colour(rng, style)
    lower = _garment_colour(rng, style)
    skin_t = rng.random()
    skin = np.array([0.95, 0.8, 0.68]) * (1 - skin_t) + np.array([0.38, 0.25, 0.17]) * skin_t
    hair_choices = np.array(
        [[0.05, 0.04, 0.03], [0.3, 0.18, 0.08], [0.75, 0.62, 0.35], [0.6, 0.6, 0.6]]
    )
    emblems = ["none", "circle", "square", "triangle", "bar"]
    emblem = rng.choice(emblems, p=[0.4, 0.15, 0.15, 0.15, 0.15])
    return Identity(
        height=float(rng.uniform(0.86, 1.0)),
        width=float(rng.uniform(0.8, 1.25)),
        skin=skin.astype(np.float32),
        hair=hair_choices[rng.choice(4, p=[0.45, 0.3, 0.15, 0.1])].astype(np.float32),
        hair_long=bool(rng.random() < 0.3),
        upper=upper,
        upper2=_contrasting(rng, style, upper),
        upper_texture=str(rng.choice(textures, p=probs / probs.sum())),
        upper_period=float(rng.uniform(0.035, 0.08)),
        upper_duty=float(rng.uniform(0.3, 0.6)),
        sleeves_long=bool(rng.random() < 0.55),
        lower=lower,
        lower2=_contrasting(rng, style, lower),
        lower_texture=str(rng.choice(["solid", "hstripes", "checks"], p=[0.8, 0.1, 0.1])),
        lower_type=str(rng.choice(["trousers", "shorts", "skirt"], p=[0.65, 0.2, 0.15])),
        shoes=_garment_colour(rng, style) * 0.6,
        hat=_garment_colour(rng, style) if rng.random() < 0.2 else None,
        backpack=_garment_colour(rng, style) if rng.random() < 0.3 else None,
        bag=_garment_colour(rng, style) if rng.random() < 0.25 else None,
        bag_side=int(rng.choice([-1, 1])),
        emblem=None if emblem == "none" else str(emblem),
        emblem_colour=_contrasting(rng, style, upper),
    )


def sample_camera(rng: np.random.Generator, style: DomainStyle) -> Camera:
    """Draw one camera's style from the domain's distributions."""
    bg_hue = rng.random()

    def bg(value_scale: float) -> np.ndarray:
        return _hsv(
            bg_hue + rng.normal(0, 0.05),
            rng.uniform(*style.background_saturation),
            rng.uniform(*style.background_value) * value_scale,
        )

    return Camera(
        view_probs=rng.dirichlet(np.full(4, style.view_concentration)),
        gain=float(rng.uniform(*style.gain)),
        cast=np.exp(rng.normal(0, style.cast_sigma, 3)).astype(np.float32),
        gamma=float(rng.uniform(*style.gamma)),
        haze=float(rng.uniform(*style.haze)),
        haze_colour=_hsv(rng.random(), 0.3, 0.7),
        noise=float(rng.uniform(*style.noise)),
        blur=float(rng.uniform(*style.blur)),
        wall=bg(1.0),
        floor=bg(0.8),
        horizon=float(rng.uniform(0.55, 0.8)),
        clutter_colours=np.stack([bg(rng.uniform(0.6, 1.2)) for _ in range(6)]),
        clutter=style.clutter,
        person_scale=style.person_scale,
        occlusion_prob=style.occlusion_prob,
        jpeg_quality=int(rng.integers(style.jpeg_quality[0], style.jpeg_quality[1] + 1)),
        illumination_gradient=style.illumination_gradient,
    )


# --------------------------------------------------------------------------- rendering
Colour = Any  # (3,) array, or a callable (yy (h, 1), xx (1, w)) -> (h, w, 3)
Pred = Callable[[np.ndarray, np.ndarray], np.ndarray] | None


class _Canvas:
    """A supersampled RGB float canvas. Shapes are painted inside their bounding box only, with
    broadcast 1-D pixel-centre coordinates (vectorised numpy, no full-canvas masks)."""

    def __init__(self, height: int, width: int, supersample: int = 2) -> None:
        self.ss = supersample
        self.H, self.W = height * supersample, width * supersample
        self.ys = np.arange(self.H, dtype=np.float32) + 0.5
        self.xs = np.arange(self.W, dtype=np.float32) + 0.5
        self.img = np.zeros((self.H, self.W, 3), np.float32)
        self.person = np.zeros((self.H, self.W), np.float32)

    def paint(
        self,
        y0: float,
        y1: float,
        x0: float,
        x1: float,
        colour: Colour,
        pred: Pred = None,
        person: bool = True,
    ) -> None:
        """Fill the pixels of the box [y0, y1) x [x0, x1) where `pred(yy, xx)` holds."""
        iy0, iy1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), self.H)
        ix0, ix1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), self.W)
        if iy0 >= iy1 or ix0 >= ix1:
            return
        yy, xx = self.ys[iy0:iy1, None], self.xs[None, ix0:ix1]
        mask = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
        if pred is not None:
            mask = mask & pred(yy, xx)
        col = colour(yy, xx) if callable(colour) else np.asarray(colour, np.float32)
        np.copyto(self.img[iy0:iy1, ix0:ix1], col, where=mask[..., None])
        if person:
            self.person[iy0:iy1, ix0:ix1][mask] = 1.0

    def rect(
        self, y0: float, y1: float, x0: float, x1: float, colour: Colour, person: bool = True
    ) -> None:
        self.paint(y0, y1, x0, x1, colour, None, person)

    def ellipse(
        self, cy: float, cx: float, ry: float, rx: float, colour: Colour, pred: Pred = None
    ) -> None:
        def inside(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            return m if pred is None else m & pred(yy, xx)

        self.paint(cy - ry, cy + ry, cx - rx, cx + rx, colour, inside)

    def trapezoid(
        self, y0: float, y1: float, cx: float, hw0: float, hw1: float, colour: Colour
    ) -> None:
        """Rows y0..y1, half-width growing linearly from hw0 to hw1, centred on cx."""

        def inside(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
            t = np.clip((yy - y0) / max(y1 - y0, 1e-6), 0, 1)
            return np.abs(xx - cx) <= hw0 + (hw1 - hw0) * t

        hw = max(hw0, hw1)
        self.paint(y0, y1, cx - hw, cx + hw, colour, inside)

    def line(
        self, y0: float, x0: float, y1: float, x1: float, half_width: float, colour: Colour
    ) -> None:
        """A thick segment (capsule) from (y0, x0) to (y1, x1)."""
        dy, dx = y1 - y0, x1 - x0
        length2 = dy * dy + dx * dx + 1e-6

        def inside(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
            t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / length2, 0, 1)
            return (yy - y0 - t * dy) ** 2 + (xx - x0 - t * dx) ** 2 <= half_width**2

        hw = half_width
        self.paint(
            min(y0, y1) - hw, max(y0, y1) + hw, min(x0, x1) - hw, max(x0, x1) + hw, colour, inside
        )

    def downsample(self) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3), person coverage (H, W) in [0, 1]) at the output resolution."""
        s = self.ss
        # sums of strided views: much faster than reshape(...).mean(axis=(1, 3)) here
        img = sum(self.img[i::s, j::s] for i in range(s) for j in range(s)) / (s * s)
        person = sum(self.person[i::s, j::s] for i in range(s) for j in range(s)) / (s * s)
        return img, person


def _pattern(
    texture: str,
    c1: np.ndarray,
    c2: np.ndarray,
    top: float,
    cx: float,
    ph: float,
    period: float,
    duty: float,
    split: float,
) -> Colour:
    """A garment texture anchored on the person (stripes scale with the body)."""
    p = period * ph
    conds: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "hstripes": lambda yy, xx: ((yy - top) / p % 1.0) < duty,
        "vstripes": lambda yy, xx: (((xx - cx) / p + 0.25) % 1.0) < duty,
        "checks": lambda yy, xx: (((yy - top) / p % 1.0) < 0.5) ^ (((xx - cx) / p % 1.0) < 0.5),
        "two_tone": lambda yy, xx: yy >= top + split * ph,
    }
    if texture not in conds:
        return c1
    cond = conds[texture]
    return lambda yy, xx: np.where(cond(yy, xx)[..., None], c2, c1)


def render_person(
    c: _Canvas,
    ident: Identity,
    view: str,
    top: float,
    cx: float,
    ph: float,
    rng: np.random.Generator,
) -> None:
    """Paint a person of height `ph` (canvas pixels) whose head top is at `top`, centred on `cx`.

    The view decides what is visible: the face and chest emblem from the front, the backpack from
    behind (only its straps from the front, a bump from the side), a narrow profile from the side
    with the shoulder bag only on the side it is carried.
    """
    side = view in ("left", "right")
    facing = -1.0 if view == "left" else 1.0  # image direction the person faces in side views
    bw = ph * 0.27 * ident.width  # shoulder width
    hw_sh, hw_waist = bw / 2, bw * 0.42
    if side:
        hw_sh, hw_waist = hw_sh * 0.62, hw_waist * 0.62
    y_sh, y_waist, y_foot = top + 0.16 * ph, top + 0.52 * ph, top + 0.96 * ph
    stride = rng.uniform(0.0, 0.09) * ph if side else rng.uniform(0.0, 0.03) * ph
    # Carried on the person's right: image-left when facing the camera, image-right from behind.
    bag_x_sign = -ident.bag_side if view == "front" else ident.bag_side
    bag_visible = not side or (view == "left") == (ident.bag_side > 0)
    upper = _pattern(
        ident.upper_texture,
        ident.upper,
        ident.upper2,
        top,
        cx,
        ph,
        ident.upper_period,
        ident.upper_duty,
        0.34,
    )
    lower = _pattern(
        ident.lower_texture,
        ident.lower,
        ident.lower2,
        top,
        cx,
        ph,
        ident.upper_period * 1.3,
        0.5,
        0.75,
    )

    if ident.backpack is not None and side:  # sticks out behind the body: painted first
        x_back = cx - facing * hw_sh
        x0, x1 = sorted((x_back, x_back - facing * 0.2 * bw))
        c.rect(y_sh + 0.02 * ph, y_sh + 0.3 * ph, x0, x1, ident.backpack)
    # legs and shoes
    leg_hw = bw * (0.16 if side else 0.13)
    spread = 0.0 if side else bw * 0.12
    y_lower_end = {"trousers": y_foot, "shorts": top + 0.68 * ph, "skirt": top + 0.7 * ph}
    shoe_dx = facing * 0.05 * ph if side else 0.0
    for lx in (cx - stride - spread, cx + stride + spread):
        c.rect(y_waist, y_foot, lx - leg_hw * 0.8, lx + leg_hw * 0.8, ident.skin)
        if ident.lower_type != "skirt":
            c.rect(y_waist, y_lower_end[ident.lower_type], lx - leg_hw, lx + leg_hw, lower)
        c.rect(
            y_foot - 0.01 * ph,
            top + ph,
            lx - leg_hw + min(shoe_dx, 0),
            lx + leg_hw + max(shoe_dx, 0),
            ident.shoes,
        )
    if ident.lower_type == "skirt":
        c.trapezoid(y_waist - 0.02 * ph, y_lower_end["skirt"], cx, hw_waist, hw_waist * 1.35, lower)
    c.trapezoid(y_sh, y_waist, cx, hw_sh, hw_waist, upper)  # torso
    # arms (one, in front of the body, in side views)
    arm_hw = bw * 0.08
    swing = rng.uniform(-0.06, 0.06) * ph if side else 0.0
    arm_xs = [cx + swing] if side else [cx - hw_sh - arm_hw * 0.6, cx + hw_sh + arm_hw * 0.6]
    y_sleeve = top + (0.5 if ident.sleeves_long else 0.28) * ph
    for ax in arm_xs:
        lean = swing * 0.5
        c.line(y_sh + 0.02 * ph, ax, top + 0.52 * ph, ax + lean, arm_hw, ident.skin)
        c.line(
            y_sh + 0.02 * ph,
            ax,
            y_sleeve,
            ax + lean * (y_sleeve - y_sh) / (0.36 * ph),
            arm_hw * 1.15,
            upper,
        )
    # accessories on the body
    if ident.backpack is not None and not side:
        if view == "back":
            c.rect(
                y_sh + 0.03 * ph, y_sh + 0.28 * ph, cx - bw * 0.33, cx + bw * 0.33, ident.backpack
            )
            c.rect(
                y_sh + 0.03 * ph,
                y_sh + 0.07 * ph,
                cx - bw * 0.33,
                cx + bw * 0.33,
                ident.backpack * 0.6,
            )
        else:  # straps only
            for sx in (-1, 1):
                x = cx + sx * bw * 0.3
                c.rect(y_sh, y_sh + 0.22 * ph, x - bw * 0.05, x + bw * 0.05, ident.backpack)
    if ident.emblem is not None and view == "front":
        ey, ex, r = top + 0.27 * ph, cx + bw * 0.18, bw * 0.11
        if ident.emblem == "circle":
            c.ellipse(ey, ex, r, r, ident.emblem_colour)
        elif ident.emblem == "square":
            c.rect(ey - r, ey + r, ex - r, ex + r, ident.emblem_colour)
        elif ident.emblem == "triangle":
            c.paint(
                ey - r,
                ey + r,
                ex - r,
                ex + r,
                ident.emblem_colour,
                lambda yy, xx: np.abs(xx - ex) <= (yy - ey + r) / 2,
            )
        else:  # bar
            c.rect(ey - r * 0.4, ey + r * 0.4, ex - r * 1.4, ex + r * 1.4, ident.emblem_colour)
    if ident.bag is not None and bag_visible:
        bx = cx + (0.0 if side else bag_x_sign * (hw_waist + bw * 0.12))
        if not side:  # strap across the body from the other shoulder
            c.line(
                y_sh,
                cx - bag_x_sign * hw_sh * 0.8,
                top + 0.44 * ph,
                bx,
                bw * 0.035,
                ident.bag * 0.7,
            )
        c.rect(top + 0.42 * ph, top + 0.58 * ph, bx - bw * 0.16, bx + bw * 0.16, ident.bag)
    # neck, head, hair, hat
    hy, hry, hrx = top + 0.075 * ph, 0.066 * ph, bw * (0.2 if side else 0.22)
    c.rect(top + 0.12 * ph, y_sh + 0.01 * ph, cx - bw * 0.08, cx + bw * 0.08, ident.skin)
    c.ellipse(hy, cx, hry, hrx, ident.skin)
    if view == "back":
        c.ellipse(hy, cx, hry, hrx, ident.hair)
        if ident.hair_long:
            c.rect(hy, y_sh + 0.1 * ph, cx - hrx, cx + hrx, ident.hair)
    elif side:
        c.ellipse(
            hy,
            cx,
            hry,
            hrx,
            ident.hair,
            lambda yy, xx: ((xx - cx) * facing < -0.1 * hrx) | (yy < hy - 0.4 * hry),
        )
        if ident.hair_long:
            x0, x1 = sorted((cx - facing * 0.2 * hrx, cx - facing * hrx))
            c.rect(hy, y_sh + 0.08 * ph, x0, x1, ident.hair)
    else:
        c.ellipse(hy, cx, hry, hrx, ident.hair, lambda yy, xx: yy < hy - 0.45 * hry)
        if ident.hair_long:
            for sx in (-1, 1):
                x0, x1 = sorted((cx + sx * hrx * 0.75, cx + sx * hrx * 1.1))
                c.rect(hy - 0.5 * hry, y_sh + 0.06 * ph, x0, x1, ident.hair)
    if ident.hat is not None:
        c.ellipse(hy, cx, hry, hrx, ident.hat, lambda yy, xx: yy < hy - 0.3 * hry)
        if side:
            x0, x1 = sorted((cx, cx + facing * hrx * 1.6))
        else:
            x0, x1 = cx - hrx * 1.15, cx + hrx * 1.15
        c.rect(hy - 0.45 * hry, hy - 0.25 * hry, x0, x1, ident.hat * 0.85)


def _background(height: int, width: int, cam: Camera, rng: np.random.Generator) -> np.ndarray:
    """Wall and floor of the camera's scene with a low-frequency texture and clutter objects
    (poles, railings, boxes, blobs) behind the person: float (height, width, 3)."""
    c = _Canvas(height, width, supersample=1)
    jitter = rng.uniform(0.9, 1.1, 3).astype(np.float32)
    horizon = (cam.horizon + rng.normal(0, 0.04)) * height
    c.img[:] = cam.floor * jitter
    c.rect(0, horizon, 0, width, cam.wall * jitter, person=False)
    coarse = Image.fromarray(rng.uniform(0.85, 1.15, (4, 3)).astype(np.float32), mode="F")
    c.img *= np.asarray(coarse.resize((width, height), Image.Resampling.BILINEAR))[..., None]
    for _ in range(int(rng.integers(cam.clutter[0], cam.clutter[1] + 1))):
        colour = cam.clutter_colours[rng.integers(len(cam.clutter_colours))]
        colour = (colour * rng.uniform(0.7, 1.3)).astype(np.float32)
        y, x = rng.uniform(0, height), rng.uniform(0, width)
        h, w = rng.uniform(0.05, 0.5) * height, rng.uniform(0.05, 0.5) * width
        kind = rng.integers(4)
        if kind == 0:
            c.rect(y - h / 2, y + h / 2, x - w / 2, x + w / 2, colour, person=False)
        elif kind == 1:
            c.paint(
                y - h / 3,
                y + h / 3,
                x - w / 3,
                x + w / 3,
                colour,
                lambda yy, xx, y=y, x=x, h=h, w=w: (
                    ((yy - y) / (h / 3)) ** 2 + ((xx - x) / (w / 3)) ** 2 <= 1
                ),
                person=False,
            )
        elif kind == 2:  # pole
            c.rect(0, height, x, x + width * 0.06, colour, person=False)
        else:  # railing
            c.rect(y, y + height * 0.02, 0, width, colour, person=False)
    return c.img


def render_image(
    ident: Identity,
    cam: Camera,
    rng: np.random.Generator,
    height: int,
    width: int,
    junk: bool = False,
) -> np.ndarray:
    """One detection box of `ident` seen by `cam`: uint8 (height, width, 3).

    `junk` renders a bad detection (a far too large, displaced box: a fragment of a person).
    """
    c = _Canvas(height, width)
    background = _background(height, width, cam, rng)
    view = VIEWS[rng.choice(4, p=cam.view_probs)]
    ph = rng.uniform(*cam.person_scale) * ident.height * c.H
    top = (c.H - ph) * rng.uniform(0.2, 0.9)
    cx = c.W / 2 + rng.normal(0, 0.05) * c.W
    if junk:
        ph *= rng.uniform(1.3, 2.2)
        top = -rng.uniform(0.3, 0.6) * ph
        cx = c.W * rng.choice([-0.05, 1.05]) + rng.normal(0, 0.05) * c.W
    render_person(c, ident, view, top, cx, ph, rng)
    img, coverage = c.downsample()
    # body shading (darker towards the silhouette's sides), then composite over the background
    xs = (np.arange(width, dtype=np.float32) + 0.5) * c.ss
    shade = 1.0 - 0.35 * np.clip(np.abs(xs - cx) / (0.18 * ph), 0, 1) ** 2
    img = coverage[..., None] * img * shade[None, :, None] + (1 - coverage[..., None]) * background
    if rng.random() < cam.occlusion_prob:  # partial occlusion by an object in front
        colour = cam.clutter_colours[rng.integers(len(cam.clutter_colours))] * 0.8
        if rng.random() < 0.6:  # from below (a car, a bench)
            img[int(height * (1 - rng.uniform(0.2, 0.4))) :] = colour
        else:  # from a side (a pillar, another person)
            w = max(int(rng.uniform(0.2, 0.35) * width), 1)
            if rng.random() < 0.5:
                img[:, :w] = colour
            else:
                img[:, width - w :] = colour
    # camera: illumination (+ a gradient), colour cast, gamma, haze, blur, noise
    grad = cam.illumination_gradient * rng.uniform(-1, 1)
    if rng.random() < 0.5:
        ramp = 1.0 + grad * np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :, None]
    else:
        ramp = 1.0 + grad * np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None, None]
    img = img * (cam.gain * rng.uniform(0.9, 1.1)) * cam.cast * ramp
    img = np.clip(img, 0, 1) ** cam.gamma
    img = img * (1 - cam.haze) + cam.haze * cam.haze_colour
    sigma = cam.blur * height / 128.0
    if sigma > 0.05:
        img = gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest")
    img = img + cam.noise * rng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- dataset plan
@dataclass(frozen=True)
class _ImageJob:
    file_name: str  # relative to the dataset root
    kind: int  # 0: identity image, 1: distractor, 2: junk
    identity: int  # index into the identity list (distractors/junk: their own index)
    camera: int  # 0-based
    stream: int  # RNG stream of this image


def _plan(config: SyntheticConfig, domain: str, seed: int) -> list[_ImageJob]:
    """Which image goes where: identities, cameras, splits and Market-1501 file names."""
    rng = _rng(seed, domain, 0)
    n_ids = config.num_train_ids + config.num_test_ids
    pids = rng.permutation(n_ids) + 1  # Market-like: train and test ids interleave in 1..N
    is_train = np.zeros(n_ids, bool)
    is_train[rng.choice(n_ids, config.num_train_ids, replace=False)] = True
    frame_counter = np.zeros(config.num_cameras, np.int64)
    ext = config.image_format

    def name(pid_str: str, cam: int) -> str:
        frame_counter[cam] += 1
        frame = int(frame_counter[cam]) * 25 + int(rng.integers(25))
        seq = int(rng.integers(1, 7))
        return f"{pid_str}_c{cam + 1}s{seq}_{frame:06d}_{int(rng.integers(0, 8)):02d}.{ext}"

    jobs: list[_ImageJob] = []
    stream = 0
    excess_mean = config.mean_images - config.min_images
    for i in range(n_ids):
        span = config.max_images - config.min_images
        extra = rng.gamma(4.0, excess_mean / 4.0) if excess_mean > 0 else 0.0
        n = config.min_images + min(int(round(extra)), span)
        max_cams = min(config.max_cameras_per_id, config.num_cameras, n)
        k = int(rng.integers(2, max_cams + 1)) if max_cams > 2 else 2
        cams = rng.choice(config.num_cameras, k, replace=False)
        per_cam = np.concatenate([cams, rng.choice(cams, n - k)])  # every camera at least once
        if is_train[i]:
            splits = ["bounding_box_train"] * n
        else:
            # one query in each camera but one (Market-style), so every query has a gallery match
            # in another camera; the rest go to the gallery
            query_cams = set(cams[1:].tolist())
            splits = []
            for cam in per_cam.tolist():
                if cam in query_cams:
                    query_cams.discard(cam)
                    splits.append("query")
                else:
                    splits.append("bounding_box_test")
        for cam, split in zip(per_cam.tolist(), splits):
            jobs.append(_ImageJob(f"{split}/{name(f'{pids[i]:04d}', cam)}", 0, i, cam, stream))
            stream += 1
    for j in range(config.num_distractors):
        cam = int(rng.integers(config.num_cameras))
        jobs.append(_ImageJob(f"bounding_box_test/{name('0000', cam)}", 1, j, cam, stream))
        stream += 1
    for j in range(config.num_junk):
        cam = int(rng.integers(config.num_cameras))
        jobs.append(_ImageJob(f"bounding_box_test/{name('-1', cam)}", 2, j, cam, stream))
        stream += 1
    return jobs


def _render_jobs(args: tuple[SyntheticConfig, str, int, str, Sequence[_ImageJob]]) -> int:
    """Render and write a chunk of jobs (a worker-process entry point)."""
    config, domain, seed, out_dir, jobs = args
    style = DOMAINS[domain]
    cameras = [sample_camera(_rng(seed, domain, 2, c), style) for c in range(config.num_cameras)]
    cache: dict[tuple[int, int], Identity] = {}
    for job in jobs:
        key = (job.kind, job.identity)
        if key not in cache:
            cache[key] = sample_identity(_rng(seed, domain, 1, job.kind, job.identity), style)
        rng = _rng(seed, domain, 3, job.stream)
        pixels = render_image(
            cache[key], cameras[job.camera], rng, config.height, config.width, junk=job.kind == 2
        )
        buf = io.BytesIO()
        if config.image_format == "jpg":
            Image.fromarray(pixels).save(
                buf, format="JPEG", quality=cameras[job.camera].jpeg_quality
            )
        else:
            Image.fromarray(pixels).save(buf, format="PNG")
        with open(os.path.join(out_dir, job.file_name), "wb") as f:
            f.write(buf.getvalue())
    return len(jobs)


def _manifest(config: SyntheticConfig, domain: str, seed: int) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "domain": domain,
        "seed": seed,
        "config": asdict(config),
    }


def generate(
    out_dir: str | os.PathLike[str],
    domain: str = "A",
    seed: int = 0,
    config: SyntheticConfig | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Write one domain into `out_dir` (which must not exist or be empty): Market-1501 layout.

    Writes into a temporary sibling folder and renames it into place, so a reader never sees a
    half-written dataset. Returns the manifest (also saved as ``marlin_synthetic.json``).
    """
    if domain not in DOMAINS:
        raise KeyError(f"unknown synthetic domain {domain!r}; known: {sorted(DOMAINS)}")
    config = config or SyntheticConfig()
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        for split in ("bounding_box_train", "query", "bounding_box_test"):
            os.makedirs(os.path.join(tmp, split))
        jobs = _plan(config, domain, seed)
        chunks = [jobs[i :: max(workers, 1) * 4] for i in range(max(workers, 1) * 4)]
        tasks = [(config, domain, seed, tmp, chunk) for chunk in chunks if chunk]
        start = time.perf_counter()
        if workers > 1:
            # spawn, not fork: the parent may hold torch/OpenMP threads (a forked copy can hang)
            with ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn")
            ) as pool:
                written = sum(pool.map(_render_jobs, tasks))
        else:
            written = sum(map(_render_jobs, tasks))
        manifest = _manifest(config, domain, seed)
        manifest["num_images"] = written
        manifest["seconds"] = round(time.perf_counter() - start, 2)
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
        os.rename(tmp, out_dir)  # atomic; fails if out_dir is a non-empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock (no-op where fcntl is unavailable: the rename stays atomic)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_manifest(root: str, expected: dict[str, Any]) -> bool:
    """True if `root` holds this exact generation; raise if it holds something else."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        if os.path.isdir(root) and os.listdir(root):
            raise FileExistsError(
                f"{root} exists and is not a synthetic dataset (no {MANIFEST}); refusing to "
                "overwrite it: choose another root"
            )
        return False
    with open(path, encoding="utf-8") as f:
        found = json.load(f)
    diff = sorted(k for k in expected if found.get(k) != expected[k])
    if diff:
        details = ", ".join(f"{k}: found {found.get(k)!r}, asked {expected[k]!r}" for k in diff)
        raise FileExistsError(
            f"{root} holds a different synthetic dataset ({details}); delete it, or choose "
            "another root"
        )
    return True


def ensure_generated(
    root: str | os.PathLike[str],
    domain: str = "A",
    seed: int = 0,
    config: SyntheticConfig | None = None,
    workers: int = 1,
) -> bool:
    """Generate the domain into `root` unless it is already there. Returns True if generated.

    Safe when several processes (DDP ranks, parallel test workers) call it at once: a lock file
    next to `root` serialises them, and the dataset appears by an atomic rename.
    """
    config = config or SyntheticConfig()
    root = os.path.abspath(root)
    expected = _manifest(config, domain, seed)
    if _check_manifest(root, expected):
        return False
    os.makedirs(os.path.dirname(root), exist_ok=True)
    lock = os.path.join(os.path.dirname(root), f".{os.path.basename(root)}.lock")
    with _file_lock(lock):
        if _check_manifest(root, expected):
            return False
        if os.path.isdir(root):  # empty folder: make room for the rename
            os.rmdir(root)
        generate(root, domain, seed, config, workers)
    return True


class SyntheticReID(Market1501):
    """The synthetic benchmark: generated into `root` on first use (cached), parsed as Market-1501.

    Args:
        root: dataset folder (created).
        domain: "A" or "B".
        seed: generation seed (the same seed in A and B still gives disjoint identities).
        preset: "default" (250 + 250 ids, 128×64) or "tiny" (12 + 12 ids, 32×16, for tests).
        workers: generation processes.
        combine_all: see :class:`~src.data.datasets.ReIDDataset`.
        **overrides: :class:`SyntheticConfig` fields (num_train_ids, height, ...).
    """

    display_name = "synthetic"

    def __init__(
        self,
        root: str | os.PathLike[str],
        domain: str = "A",
        seed: int = 0,
        preset: str = "default",
        workers: int = 1,
        combine_all: bool = False,
        **overrides: Any,
    ) -> None:
        self.domain, self.seed = domain, seed
        self.config = make_config(preset, **overrides)
        ensure_generated(root, domain, seed, self.config, workers)
        super().__init__(root, combine_all=combine_all)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m src.data.synthetic --out DIR --domain A|B --seed N [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m src.data.synthetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, help="dataset folder to create")
    parser.add_argument("--domain", default="A", choices=sorted(DOMAINS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--force", action="store_true", help="replace an existing dataset")
    for f in fields(SyntheticConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(SyntheticConfig)}
    config = make_config(args.preset, **{k: v for k, v in overrides.items() if v is not None})
    if args.force and os.path.isdir(args.out):
        if not os.path.isfile(os.path.join(args.out, MANIFEST)):
            print(f"{args.out} is not a synthetic dataset; not deleting it", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)
    start = time.perf_counter()
    try:
        generated = ensure_generated(args.out, args.domain, args.seed, config, args.workers)
    except FileExistsError as e:
        print(e, file=sys.stderr)
        return 2
    data = Market1501(args.out)
    verb = "generated" if generated else "already present"
    print(f"{verb} in {time.perf_counter() - start:.1f} s (domain {args.domain}, seed {args.seed})")
    print(data.summary())
    return 0


__all__ = [
    "DOMAINS",
    "PRESETS",
    "SyntheticConfig",
    "SyntheticReID",
    "ensure_generated",
    "generate",
    "make_config",
    "render_image",
]

if __name__ == "__main__":
    sys.exit(main())

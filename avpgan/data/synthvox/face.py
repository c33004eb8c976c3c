"""SynthVox faces: one photo of an identity, drawn with PIL from its attributes (geometry and
colour), with what changes per photo (background, pose, lighting, expression, glasses, curls).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from avpgan.data.synthvox.identity import Identity

FACE_SIZE = 128  # written size; the shard builder derives its 64 and 128 versions from it

_SUPER = 2  # drawn at twice the written size, then downsampled: anti-aliasing
_MARGIN = 0.125  # extra canvas around the crop so that rotation never shows an empty corner


def _rgb(text: str) -> np.ndarray:
    return np.array([int(text[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float64)


def _gradient(rng: np.random.Generator, size: int) -> Image.Image:
    c1, c2 = rng.uniform(30, 235, 3), rng.uniform(30, 235, 3)
    if rng.random() < 0.3:
        c2 = c1 + rng.uniform(-15, 15, 3)
    a = rng.uniform(0, 2 * np.pi)
    u = np.linspace(-0.5, 0.5, size)
    w = np.clip(np.cos(a) * u[None, :] + np.sin(a) * u[:, None] + 0.5, 0, 1)[..., None]
    return Image.fromarray(np.clip(c1 * (1 - w) + c2 * w, 0, 255).astype(np.uint8), "RGB")


def draw_face(ident: Identity, rng: np.random.Generator) -> Image.Image:
    """One photo of `ident`: 128x128 RGB. Geometry and colour follow the identity; the
    background, pose, lighting, expression, glasses and hair details change per photo."""
    S = FACE_SIZE * _SUPER
    canvas = int(round(S * (1 + 2 * _MARGIN)))
    img = _gradient(rng, canvas)
    d = ImageDraw.Draw(img, "RGBA")
    male = ident.gender == "m"
    ageing = max(ident.age - 20, 0) / 55

    def P(x: float, y: float) -> tuple[float, float]:  # face units (crop = [0, 1]^2) -> pixels
        return ((x + _MARGIN) * S, (y + _MARGIN) * S)

    def box(x0, y0, x1, y1):
        (a, b), (c, e) = P(x0, y0), P(x1, y1)
        return [min(a, c), min(b, e), max(a, c), max(b, e)]

    def col(rgb: np.ndarray, alpha: int = 255) -> tuple[int, ...]:
        return (*(int(v) for v in np.clip(rgb, 0, 255)), alpha)

    skin = _rgb(ident.skin_rgb)
    hair = np.clip(_rgb(ident.hair_rgb) + rng.normal(0, 6, 3), 0, 255)
    zoom = math.exp(0.05 * rng.standard_normal())
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05), 0.46 + rng.uniform(-0.04, 0.04)
    yaw = rng.uniform(-0.12, 0.12)  # feature shift toward one side: a head turned a little

    # Geometry from the shared attributes (and timbre, subtly), fixed per identity.
    b = 0.30 * zoom * (1 + 0.025 * ident.size + (0.02 if male else -0.02))  # half height
    ratio = 0.76 + 0.03 * ident.size + (0.03 if male else -0.02) - 0.025 * ident.timbre_0
    a = b * ratio  # half width
    jaw = np.clip(0.70 + (0.10 if male else 0.0) + 0.04 * ident.size + 0.05 * ident.timbre_1 - 0.03 * ageing, 0.5, 0.95)

    # Hair behind the head, shoulders, neck, ears.
    style = ident.hair_style
    volume = 1 + 0.05 * rng.standard_normal()
    if style == "long":
        d.rounded_rectangle(box(cx - 1.28 * a * volume, cy - 1.08 * b, cx + 1.28 * a * volume, cy + 1.35 * b),
                            radius=0.35 * S * a, fill=col(hair))
    shirt = rng.uniform(20, 230, 3)
    sw = 0.40 * (1 + 0.08 * ident.size + (0.06 if male else -0.04)) * zoom
    d.ellipse(box(cx - sw, cy + 0.95 * b, cx + sw, cy + 0.95 * b + 0.6), fill=col(shirt))
    nw = 0.42 * a * (1 + 0.1 * ident.size + (0.1 if male else 0.0))
    d.rectangle(box(cx - nw, cy + 0.3 * b, cx + nw, cy + 1.1 * b), fill=col(skin * 0.82))
    for s in (-1, 1):
        ex_ = cx + s * 0.96 * a
        d.ellipse(box(ex_ - 0.055 * zoom, cy - 0.12 * b, ex_ + 0.055 * zoom, cy + 0.22 * b), fill=col(skin * 0.9))
    if style in ("short", "curly", "bun", "long"):
        hw = 1.07 * a * volume
        d.ellipse(box(cx - hw, cy - 1.1 * b * volume, cx + hw, cy + 0.3 * b), fill=col(hair))
    if style == "bun":
        d.ellipse(box(cx - 0.35 * a, cy - 1.45 * b, cx + 0.35 * a, cy - 0.85 * b), fill=col(hair))

    # The face outline: a cranium ellipse whose lower half narrows toward the jaw and chin.
    th = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    lower = np.maximum(np.sin(th), 0)
    xs = cx + a * np.cos(th) * (1 - (1 - jaw) * lower ** 1.5)
    ys = cy + b * np.sin(th) * (1 + 0.04 * lower)
    d.polygon([P(x, y) for x, y in zip(xs, ys)], fill=col(skin))
    if not male:
        for s in (-1, 1):
            d.ellipse(box(cx + s * 0.5 * a - 0.05, cy + 0.2 * b - 0.03, cx + s * 0.5 * a + 0.05, cy + 0.2 * b + 0.03),
                      fill=(200, 80, 90, 28))

    line = col(skin * 0.62, int(60 + 120 * ageing))
    lw = max(1, int(0.006 * S))
    if ident.age > 38:  # forehead lines, crow's feet, nasolabial folds
        for i in range(min(4, int((ident.age - 38) / 9) + 1)):
            y = cy - (0.62 - 0.08 * i) * b
            d.arc(box(cx - 0.45 * a, y - 0.04, cx + 0.45 * a, y + 0.04), 200, 340, fill=line, width=lw)
        for s in (-1, 1):
            x = cx + yaw * a * 0.4
            d.line([P(x + s * 0.38 * a, cy + 0.22 * b), P(x + s * 0.5 * a, cy + 0.62 * b)], fill=line, width=lw)
    if ident.beard > 0:
        bt = np.linspace(0.15 * np.pi, 0.85 * np.pi, 30)
        outer = [P(cx + a * np.cos(t_) * (1 - (1 - jaw) * np.sin(t_) ** 1.5), cy + b * np.sin(t_) * 1.04) for t_ in bt]
        inner = [P(cx + 0.55 * a * np.cos(t_), cy + 0.45 * b + 0.25 * b * np.sin(t_)) for t_ in bt[::-1]]
        d.polygon(outer + inner, fill=col(hair, int(90 + 150 * ident.beard)))

    # Eyes, brows, nose, mouth, shifted by the yaw.
    ex = a * (0.40 + 0.035 * ident.eye_spacing)
    ey = cy - 0.08 * b
    er = a * (0.13 + 0.012 * ident.eye_size + (0.0 if male else 0.015) - 0.015 * ageing)
    fx = cx + yaw * a * 0.5
    for s in (-1, 1):
        x = fx + s * ex
        d.ellipse(box(x - er, ey - 0.55 * er, x + er, ey + 0.55 * er), fill=(238, 238, 232, 255),
                  outline=col(skin * 0.5), width=lw)
        d.ellipse(box(x - 0.5 * er, ey - 0.5 * er, x + 0.5 * er, ey + 0.5 * er), fill=col(_rgb(ident.eye_rgb)))
        d.ellipse(box(x - 0.22 * er, ey - 0.22 * er, x + 0.22 * er, ey + 0.22 * er), fill=(10, 10, 10, 255))
        bw = (0.022 if male else 0.012) * zoom
        tilt = 0.008 * ident.brow_tilt
        by = ey - 1.05 * er - 0.02
        d.polygon([P(x - 1.2 * er, by + tilt * s), P(x + 1.2 * er, by - tilt * s),
                   P(x + 1.2 * er, by - tilt * s + bw * 0.6), P(x - 1.2 * er, by + tilt * s + bw)],
                  fill=col(hair * 0.8))
    nl = b * (0.36 + 0.03 * ident.size + 0.03 * ident.nose_length)
    nwid = a * (0.15 + 0.02 * ident.timbre_2 + (0.02 if male else 0.0))
    nx = cx + yaw * a * 0.8
    d.line([P(nx, ey + 0.05 * b), P(nx + 0.3 * nwid, ey + nl)], fill=col(skin * 0.75), width=lw)
    for s in (-1, 1):
        d.ellipse(box(nx + s * nwid - 0.25 * nwid, ey + nl - 0.02, nx + s * nwid + 0.25 * nwid, ey + nl + 0.01),
                  fill=col(skin * 0.45))
    d.arc(box(nx - nwid, ey + nl - 0.05, nx + nwid, ey + nl + 0.02), 20, 160, fill=col(skin * 0.7), width=lw)
    mw = a * (0.36 + 0.03 * ident.mouth_width)
    my = cy + 0.5 * b
    mx = cx + yaw * a * 0.6
    smile = rng.uniform(-0.2, 1.0)
    lips = skin * 0.7 + np.array([150.0, 50, 60]) * (0.2 if male else 0.4)
    lip_h = b * (0.05 + (0.0 if male else 0.02))
    d.chord(box(mx - mw, my - lip_h - 0.02 * smile, mx + mw, my + lip_h + 0.03 * smile), 0, 180, fill=col(lips))
    d.chord(box(mx - mw, my - lip_h, mx + mw, my + 0.4 * lip_h), 180, 360, fill=col(lips * 0.92))
    d.line([P(mx - mw, my), P(mx + mw, my)], fill=col(lips * 0.5), width=lw)

    # Hair in front: hairline, fringe, curls or a receding crown.
    if style in ("short", "bun"):
        d.chord(box(cx - 1.02 * a, cy - 1.08 * b * volume, cx + 1.02 * a, cy - 0.35 * b), 180, 360, fill=col(hair))
    elif style == "long":
        d.chord(box(cx - 1.04 * a, cy - 1.08 * b * volume, cx + 1.04 * a, cy - 0.25 * b), 170, 370, fill=col(hair))
    elif style == "curly":
        for _ in range(40):  # the curls themselves differ from photo to photo
            t_ = rng.uniform(np.pi, 2 * np.pi)
            r_ = rng.uniform(0.75, 1.08) * volume
            x, y = cx + r_ * a * np.cos(t_), cy - 0.3 * b + r_ * 0.85 * b * np.sin(t_)
            rr = 0.06 * zoom
            d.ellipse(box(x - rr, y - rr, x + rr, y + rr), fill=col(hair * rng.uniform(0.85, 1.1)))
    else:  # receding: hair only above the ears
        for s in (-1, 1):
            d.ellipse(box(cx + s * 0.98 * a - 0.06, cy - 0.55 * b, cx + s * 0.98 * a + 0.04, cy + 0.05 * b),
                      fill=col(hair))

    if rng.random() < ident.glasses_p:
        g = col(_rgb(ident.glasses_rgb))
        gw = max(1, int(0.01 * S))
        for s in (-1, 1):
            x = fx + s * ex
            d.rounded_rectangle(box(x - 1.45 * er, ey - 0.95 * er, x + 1.45 * er, ey + 0.95 * er),
                                radius=0.4 * er * S, outline=g, width=gw)
        d.line([P(fx - ex + 1.45 * er, ey - 0.2 * er), P(fx + ex - 1.45 * er, ey - 0.2 * er)], fill=g, width=gw)

    # Pose (in-plane rotation), crop, downsample, lighting.
    img = img.rotate(rng.uniform(-10, 10), resample=Image.BICUBIC, center=(canvas / 2, canvas / 2))
    m = (canvas - S) // 2
    img = img.crop((m, m, m + S, m + S)).resize((FACE_SIZE, FACE_SIZE), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float64)
    u = np.linspace(-1, 1, FACE_SIZE)
    la = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(0.82, 1.15) * (1 + rng.uniform(0, 0.22) * (np.cos(la) * u[None, :] + np.sin(la) * u[:, None]))
    warm = rng.uniform(-0.04, 0.04)
    arr = arr * light[..., None] * np.array([1 + warm, 1.0, 1 - warm])
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")

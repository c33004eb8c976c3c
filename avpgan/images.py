"""Images in and out: decode to RGB, square resize, [-1, 1] tensors, grids for logging.

Faces arrive as jpg/png of any size and mode (grayscale, palette, RGBA, CMYK, 16-bit) and leave as
uint8 RGB squares. The [-1, 1] scaling is Voice2Face's (x - 127.5) / 127.5.

torch is imported only by the tensor helpers: shard-build worker processes decode and resize
images and would otherwise pay for importing torch at every start.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from avpgan import atomic

if TYPE_CHECKING:
    import torch


class ImageError(ValueError):
    """A file that cannot be decoded as an image; the message names the file and the problem."""


def load_rgb(path: str | Path) -> tuple[np.ndarray, str]:
    """Decode to uint8 HxWx3 RGB and return the source mode too, so conversions can be counted.

    Transparent images are composited over black (a defined background rather than whatever
    colour the invisible pixels happen to hold); 16-bit and float images are rescaled to 8 bits.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # force the full decode: a truncated file fails here, not later
            mode = im.mode
            im = ImageOps.exif_transpose(im)
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float64)
                a = a / 257.0 if mode.startswith("I;16") or a.max() > 255 else a
                im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
            if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"{path}: cannot read image (empty, shape {rgb.shape})")
    return np.ascontiguousarray(rgb), mode


def read_image(path: str | Path) -> np.ndarray:
    """uint8 HxWx3 RGB, whatever the file's mode."""
    return load_rgb(path)[0]


def center_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return img[top : top + s, left : left + s]


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square (faces are centred in VGGFace crops), then Lanczos to size x size."""
    sq = center_square(img)
    if sq.shape[0] == size and sq.shape[1] == size:
        return np.ascontiguousarray(sq)
    return np.asarray(Image.fromarray(np.ascontiguousarray(sq)).resize((size, size), Image.LANCZOS), dtype=np.uint8)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 (or BxHxWx3) -> float32 CHW (or BCHW) in [-1, 1]."""
    import torch

    t = torch.from_numpy(np.array(img, dtype=np.float32)).sub_(127.5).div_(127.5)  # a copy: shard views are read-only
    return t.permute(2, 0, 1) if t.ndim == 3 else t.permute(0, 3, 1, 2)


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """[-1, 1] CHW (or BCHW) -> uint8 HxWx3 (or BxHxWx3); values outside are clipped."""
    a = x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)
    a = np.clip(np.round(a * 127.5 + 127.5), 0, 255).astype(np.uint8)
    return a.transpose(1, 2, 0) if a.ndim == 3 else a.transpose(0, 2, 3, 1)


def make_grid(batches: Sequence[torch.Tensor | np.ndarray] | torch.Tensor | np.ndarray, nrow: int, pad: int = 2,
              row_labels: Sequence[str] | None = None, min_cell: int = 0) -> np.ndarray:
    """Lay out the images of each [B, 3, H, W] batch in order, `nrow` per row, each batch
    starting on a new row, on black.

    Passing [real, generated] with nrow = B puts each real face above the face made from its voice.
    `row_labels`: one name per batch ("real", "generated", ...), written in a margin left of the
    batch's first row, so that a grid seen alone (in the MLflow UI) says what each row is.
    `min_cell`: images smaller than this are scaled up (nearest, every pixel stays visible),
    because the UI shows a 64 px face too small to judge.
    """
    if isinstance(batches, np.ndarray) or hasattr(batches, "detach"):
        batches = [batches]
    groups = [list(to_uint8(b if b.ndim == 4 else b[None])) for b in batches]
    images = [im for g in groups for im in g]
    if not images:
        raise ValueError("make_grid: no images")
    if row_labels is not None and len(row_labels) != len(groups):
        raise ValueError(f"make_grid: {len(row_labels)} row labels for {len(groups)} batches")
    h, w = images[0].shape[:2]
    if any(im.shape[:2] != (h, w) for im in images):
        raise ValueError(f"make_grid: images differ in size ({sorted({im.shape[:2] for im in images})})")
    scale = -(-min_cell // h) if min_cell > h else 1
    h, w = h * scale, w * scale
    ncol = max(1, min(nrow, max(len(g) for g in groups)))
    first_rows, rows = [], 0  # the row each batch starts on
    for g in groups:
        first_rows.append(rows)
        rows += -(-len(g) // ncol)
    grid = np.zeros((pad + rows * (h + pad), pad + ncol * (w + pad), 3), dtype=np.uint8)
    for g, first in zip(groups, first_rows):
        for i, im in enumerate(g):
            r, c = divmod(i, ncol)
            y, x = pad + (first + r) * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = im.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else im
    if row_labels is None:
        return grid
    font = _font(max(12, min(24, h // 6)))
    margin = pad + int(max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font) for t in row_labels)) + 8
    out = Image.fromarray(np.concatenate([np.zeros((grid.shape[0], margin, 3), np.uint8), grid], axis=1))
    draw = ImageDraw.Draw(out)
    for first, text in zip(first_rows, row_labels):
        draw.text((pad + 2, pad + first * (h + pad) + h // 2), text, fill=(255, 255, 255), font=font, anchor="lm")
    return np.asarray(out)


def with_title(grid: np.ndarray, title: str) -> np.ndarray:
    """`grid` below a line of text (the stage and step of a sample grid: the picture names itself)."""
    font = _font(18)
    strip = Image.new("RGB", (grid.shape[1], 28))
    ImageDraw.Draw(strip).text((6, 14), title, fill=(255, 255, 255), font=font, anchor="lm")
    return np.concatenate([np.asarray(strip), grid], axis=0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` px (its fixed small bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def save_png(img: np.ndarray, path: str | Path) -> None:
    """Write a uint8 HxWx3 image; temp file then rename, so a reader never sees half a PNG."""
    with atomic.replacing(path) as tmp:
        Image.fromarray(np.ascontiguousarray(img)).save(tmp, format="PNG")

"""Read a page: charseg's size limits checked before decoding, EXIF orientation applied,
any mode to RGB. A page that cannot be used raises ImageUnusable saying why."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OTHER_IMAGE_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".webp")  # reported as "convert to PNG"
# Pages predict and int8 calibration read from a folder: every format above (predict writes PNG).
PAGE_SUFFIXES = IMAGE_SUFFIXES + OTHER_IMAGE_SUFFIXES


def pages_in(folder: Path, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """The page files in FOLDER (PAGE_SUFFIXES, sorted), and what is left out: other files, and
    subfolders unless RECURSIVE (hidden entries, such as .DS_Store, are neither)."""
    entries = sorted(folder.rglob("*") if recursive else folder.iterdir())
    visible = [p for p in entries if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    pages = [p for p in visible if p.suffix.lower() in PAGE_SUFFIXES and p.is_file()]
    chosen = set(pages)
    left_out = [p for p in visible if p not in chosen and not (recursive and p.is_dir())]
    return pages, left_out


# Pages charseg reads. A larger one takes gigabytes to decode and resize (a 12000x12000 page:
# 6 GB in training, 11 GB in predict); a thinner one cannot be resized to the model's input.
MAX_IMAGE_PIXELS = 50_000_000


MIN_IMAGE_SIDE = 2


MAX_ASPECT_RATIO = 100  # long side / short side: at max_size 1024 a 60000x1 page would be 0 px tall


class ImageUnusable(DatasetError):
    """An image charseg cannot read or will not decode; `reason` says why (without the path)."""

    def __init__(self, path: Path | str, reason: str | None = None):
        # One argument: a whole message (as DataLoader workers re-raise errors).
        super().__init__(f"{path}: {reason}" if reason is not None else str(path))
        self.reason = reason if reason is not None else str(path)


def unreadable_image(name: str, exc: Exception) -> ImageUnusable:
    """The error for data Pillow cannot decode. Pillow's "cannot identify image file" names
    what it was given (for bytes, an object's repr): the name is already in the message."""
    reason = "no image format Pillow reads" if isinstance(exc, UnidentifiedImageError) else str(exc)
    return ImageUnusable(name, f"cannot read image ({reason}); re-export it as PNG or JPEG")


@contextlib.contextmanager
def open_image(path: Path | str | io.BytesIO, name: str | None = None) -> Iterator[Image.Image]:
    """Image.open with charseg's limits (MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, MAX_ASPECT_RATIO)
    checked from the header, before anything is decoded. Raises ImageUnusable naming the
    file (or NAME) and why. The image is as stored: upright_size and load_image_rgb apply
    its EXIF orientation."""
    name = name or str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError:
            raise ImageUnusable(name, f"image of more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP; charseg reads "
                                      f"pages up to {MAX_IMAGE_PIXELS / 1e6:.0f} MP: split or downscale it") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise unreadable_image(name, exc) from None
    with img:
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageUnusable(name, f"image is {width}x{height} ({width * height / 1e6:.0f} MP), over charseg's limit "
                                      f"of {MAX_IMAGE_PIXELS / 1e6:.0f} MP: split or downscale it")
        if min(width, height) < MIN_IMAGE_SIDE or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ImageUnusable(name, f"image is {width}x{height}; charseg needs at least {MIN_IMAGE_SIDE} px on "
                                      f"each side and at most {MAX_ASPECT_RATIO}:1 between them")
        yield img


def upright_size(img: Image.Image) -> tuple[int, int]:
    """Width and height as viewers (and labelling tools) show the image: swapped when its
    EXIF orientation turns it by 90 degrees (load_image_rgb applies the orientation)."""
    orientation = img.getexif().get(0x0112, 1)
    return img.size[::-1] if orientation in (5, 6, 7, 8) else img.size


def load_image_rgb(path: Path | io.BytesIO, name: str | None = None) -> np.ndarray:
    """Read any image mode (gray, RGBA, palette, 16-bit, float) as an HxWx3 uint8 RGB array, upright
    (its EXIF orientation applied, as viewers and labelling tools show it). Raises
    ImageUnusable (a DatasetError naming the file or NAME) when it cannot be used."""
    name = name or str(path)
    try:
        with open_image(path, name) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened)
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = np.asarray(img).astype(np.float64)
                # 16-bit data: scale the full 16-bit range, not the (often tiny) 8-bit one.
                scale = 255.0 / 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 1.0
                return _gray_rgb(arr, scale)
            if img.mode == "F":
                return _float_rgb(np.asarray(img), name)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Transparent pixels often hold black RGB; composite on white like a page.
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
            return np.array(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise unreadable_image(name, exc) from exc


def _gray_rgb(values: np.ndarray, scale: float) -> np.ndarray:
    """One-channel VALUES times SCALE, rounded and clipped to 0-255, as an HxWx3 uint8 gray page."""
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _float_rgb(values: np.ndarray, name: str) -> np.ndarray:
    """A float page (Pillow's mode F, as scientific TIFFs hold) as 8-bit gray, its range read
    from its values: 0-1 (the usual float convention) scaled to 0-255, 0-255 kept, up to 65535
    scaled as 16-bit data. Pillow itself clips to 0-255, so a 0-1 page would read as black."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ImageUnusable(name, "float image with no finite value; re-export it as PNG or JPEG")
    top = float(finite.max())
    if top > 65535:
        raise ImageUnusable(name, f"float image with values up to {top:g}, not 0-1, 0-255 or 0-65535; "
                                  f"rescale it and re-export it as PNG or JPEG")
    scale = 255.0 if top <= 1.0 else 1.0 if top <= 255 else 255.0 / 65535.0
    return _gray_rgb(np.nan_to_num(values.astype(np.float64), nan=0.0), scale)

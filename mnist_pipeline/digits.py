"""Digits as the network reads them: pixels checked, image files converted as MNIST was made, deskewed, normalized."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterable
from numbers import Real

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

# The input contract of the trained network: mean and standard deviation of the MNIST training pixels (in [0, 1]).
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081
SIZE = 28  # MNIST's images: 28x28, white digit on black
BOX = 20  # MNIST fitted each digit's bounding box into 20x20 ...
CENTRE = 14.0  # ... and put its centre of mass here (the mean over the real test images is 13.99, 14.01)
DESKEW_CHUNK = 10_000  # images deskewed at once: about 60 MB of sampling grid
MAX_BATCH = 10_000  # images per request: the whole MNIST test set (as pixels, 26 MB of JSON, answered in 13 s)
MAX_IMAGE_PIXELS = 4096 * 4096  # a 12-megapixel phone photo fits; a decompression bomb does not
INK = 0.15  # a pixel brighter than this fraction of the brightest one above the background belongs to the digit
MIN_CONTRAST = 32  # brightest pixel minus background, out of 255, below which an image holds no digit


class DigitError(ValueError):
    """A request the model cannot read; its message is one line naming the item and what is wrong."""


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x 28 x 28 images as a normalized float32 N x 1 x 28 x 28 tensor."""
    x = torch.from_numpy(images).float().div_(255.0)
    return x.sub_(PIXEL_MEAN).div_(PIXEL_STD).unsqueeze(1)


def deskew(images: np.ndarray) -> np.ndarray:
    """uint8 N x 28 x 28 images with each digit's slant sheared upright and its centre of mass put at CENTRE.

    The classic MNIST deskewing: from each image's second moments, the shear that makes the pixels' row
    and column uncorrelated. A slant past 45 degrees is not one of handwriting, so the shear stops there.
    """
    grid_side = torch.arange(SIZE, dtype=torch.float32)
    out = np.empty_like(images)
    for start in range(0, len(images), DESKEW_CHUNK):
        ink = torch.from_numpy(images[start : start + DESKEW_CHUNK]).float()
        total = ink.sum((1, 2)).clamp_min(1.0)
        row_mass, col_mass = ink.sum(2), ink.sum(1)
        mean_row = row_mass @ grid_side / total
        mean_col = col_mass @ grid_side / total
        rows = grid_side - mean_row[:, None]  # N x 28: each row's offset from the centre of mass
        var_row = (row_mass * rows**2).sum(1) / total
        cov = (rows[:, :, None] * (grid_side - mean_col[:, None])[:, None, :] * ink).sum((1, 2)) / total
        slant = (cov / var_row.clamp_min(1e-3)).clamp(-1.0, 1.0)
        # Where each output pixel (r, c) reads from: row r - CENTRE + mean_row, column shifted by slant per row.
        out_rows = (grid_side - CENTRE)[None, :, None].expand(len(ink), SIZE, SIZE)
        out_cols = (grid_side - CENTRE)[None, None, :].expand(len(ink), SIZE, SIZE)
        src_rows = out_rows + mean_row[:, None, None]
        src_cols = out_cols + slant[:, None, None] * out_rows + mean_col[:, None, None]
        grid = torch.stack([src_cols, src_rows], -1) * (2 / (SIZE - 1)) - 1  # grid_sample's [-1, 1] corners
        sheared = F.grid_sample(ink[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out[start : start + DESKEW_CHUNK] = sheared[:, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def check_pixels(array: np.ndarray, where: str = "pixels") -> np.ndarray:
    """MNIST-style pixels, N x 28 x 28 whole numbers 0-255 of any numeric type, as uint8."""
    if array.ndim != 3 or array.shape[1:] != (SIZE, SIZE):
        raise DigitError(f"{where}: expected N images of 28x28 pixels, got an array of shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iuf" and array.dtype != object:
        raise DigitError(f"{where}: expected numbers 0-255, got {array.dtype}")
    if array.dtype == object:
        check_numbers(array.ravel(), where)
    try:
        values = array.astype(np.float64)
    except OverflowError:  # a JSON integer of hundreds of digits
        raise DigitError(f"{where}: pixels must be whole numbers 0-255; got a number too large for a float") from None
    bad = ~np.isfinite(values) | (values < 0) | (values > 255) | (values != np.floor(values))
    if bad.any():
        image, row, col = (int(i) for i in np.argwhere(bad)[0])
        raise DigitError(
            f"{where}: pixels must be whole numbers 0-255, white digit on black as in MNIST (not normalized or "
            f"scaled to 0-1); got {values[image, row, col]:g} at image {image}, row {row}, column {col}"
        )
    return values.astype(np.uint8)


def check_numbers(values: Iterable[object], where: str) -> None:
    """Refuse pixels that are not numbers: numpy's conversions would read "255", " 7 " or true as numbers."""
    kinds = sorted({type(v).__name__ for v in values if isinstance(v, (bool, np.bool_)) or not isinstance(v, Real)})
    if kinds:
        raise DigitError(f"{where}: expected numbers 0-255 (JSON numbers, not text or true/false), got "
                         f"{', '.join(kinds)}")


def check_not_blank(pixels: np.ndarray, first: int = 0) -> None:
    """Refuse an image with no digit in it, as a blank image file is refused (`mnist_style`); `first` is the
    request's index of pixels[0]."""
    flat = (pixels.max((1, 2)).astype(np.int16) - pixels.min((1, 2))) < MIN_CONTRAST
    if flat.any():
        index = int(np.flatnonzero(flat)[0])
        raise DigitError(f"inputs[{first + index}]: no digit found: every pixel is within {MIN_CONTRAST} grey "
                         f"levels of {int(pixels[index].min())}")


def decode_image(data: bytes, where: str = "image") -> np.ndarray:
    """A PNG or JPEG file, of any size, as MNIST-style uint8 28 x 28 pixels (see `mnist_style`)."""
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours, refuses it before we see its size
        raise DigitError(f"{where}: over the limit of 16.7 megapixels (4096x4096); scale it down") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise DigitError(f"{where}: not a PNG or JPEG file ({len(data)} bytes starting {data[:8]!r})") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DigitError(
            f"{where}: {width}x{height} pixels is over the limit of 16.7 megapixels (4096x4096); scale it down"
        )
    try:
        image = eight_bit(ImageOps.exif_transpose(image))  # a phone photo's pixels as the phone shows them
        if "A" in image.getbands() or "transparency" in image.info:
            # Transparent parts as paper: a digit drawn on a transparent canvas becomes dark ink on white.
            paper = Image.new("RGBA", image.size, "white")
            image = Image.alpha_composite(paper, image.convert("RGBA"))
        gray = np.asarray(image.convert("L"), dtype=np.float32)
    except (OSError, ValueError, SyntaxError) as err:
        raise DigitError(f"{where}: a damaged {image.format} file ({' '.join(str(err).split())})") from None
    return mnist_style(gray, where)


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale PNG (Pillow's modes I;16 and I) as 8-bit, scaled by 255/65535.

    Pillow's own convert("L") clips those values at 255 instead of scaling them, which turns every pixel
    above 255 white. Other modes are 8 bits a channel already.
    """
    if not image.mode.startswith("I"):
        return image
    scaled = np.rint(np.asarray(image, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8)
    out = Image.fromarray(scaled, mode="L")
    if isinstance(image.info.get("transparency"), int):  # the one fully transparent gray value, scaled alike
        out.info["transparency"] = min(round(image.info["transparency"] / 257), 255)
    return out


def mnist_style(gray: np.ndarray, where: str = "image") -> np.ndarray:
    """A grayscale picture of one digit made as MNIST's were: white on black, fitted into 20x20, centred by mass."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 127:  # dark ink on light paper: MNIST's digits are light on dark
        gray, border = 255 - gray, 255 - border
    ink = np.clip(gray - np.median(border), 0, None)
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise DigitError(f"{where}: no digit found: the image is one flat shade")
    ink *= 255 / peak
    ink[ink < INK * 255] = 0  # paper texture and compression noise
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    digit = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = digit.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Resampled as floats, with LANCZOS's antialiasing: no rounding before the last step.
    fitted = np.asarray(Image.fromarray(digit, mode="F").resize(size, Image.Resampling.LANCZOS))
    fitted = np.clip(fitted, 0, 255)
    mass = fitted.sum()
    centre_row = (fitted.sum(1) * np.arange(fitted.shape[0])).sum() / mass
    centre_col = (fitted.sum(0) * np.arange(fitted.shape[1])).sum() / mass
    top = min(max(round(CENTRE - centre_row), 0), SIZE - fitted.shape[0])
    left = min(max(round(CENTRE - centre_col), 0), SIZE - fitted.shape[1])
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    out[top : top + fitted.shape[0], left : left + fitted.shape[1]] = fitted
    return np.rint(out).astype(np.uint8)


def image_bytes(item: object, where: str) -> bytes:
    """An image file's bytes: given as bytes, or as base64 text (what JSON can carry)."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    text = item.strip()
    if "\n" in text or "\r" in text:
        raise DigitError(f"{where}: base64 text with line breaks inside; send it on one line (`base64 -w 0 FILE`, "
                         "or remove the line breaks)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DigitError(f"{where}: text that is not base64 (send a PNG or JPEG file as base64)") from None


def read_batch(batch: object) -> np.ndarray:
    """What a client sends, as uint8 N x 28 x 28: a pixel array, or a list whose items are pixels or image files.

    An item is a 28x28 array of whole numbers 0-255 (white on black, as MNIST), or a PNG or JPEG file (bytes,
    or base64 text). The whole batch as one N x 28 x 28 array is the fast path.
    """
    if isinstance(batch, np.ndarray) and batch.ndim == 3:
        items = batch
    elif isinstance(batch, (list, tuple)) or (isinstance(batch, np.ndarray) and batch.ndim > 0):
        items = list(batch)
    else:
        raise DigitError(
            f"inputs: expected a list of images (28x28 pixel arrays or base64 PNG/JPEG files), got {describe(batch)}"
        )
    if len(items) == 0:
        raise DigitError("inputs: an empty batch; send at least one image")
    if len(items) > MAX_BATCH:
        raise DigitError(f"inputs: {len(items)} images is over the limit of {MAX_BATCH:,} a request; split the batch")
    if isinstance(items, np.ndarray):
        pixels = check_pixels(items)
        check_not_blank(pixels)
        return pixels
    pixels = np.empty((len(items), SIZE, SIZE), dtype=np.uint8)
    for index, item in enumerate(items):
        where = f"inputs[{index}]"
        if isinstance(item, (str, bytes, bytearray)):  # numpy's str_ and bytes_ too
            pixels[index] = decode_image(image_bytes(item, where), where)
            continue
        try:
            array = np.asarray(item)
        except ValueError:  # nested lists of different lengths
            raise DigitError(f"{where}: expected 28x28 pixels, got rows of different lengths") from None
        if array.shape != (SIZE, SIZE):
            raise DigitError(f"{where}: expected 28x28 pixels or a base64 PNG/JPEG file, got {describe(item)}")
        if isinstance(item, (list, tuple)):  # np.asarray reads [true, 7] as [1, 7]: look at what was sent
            check_numbers((value for row in item for value in row), where)
        pixels[index] = check_pixels(array[None], where)[0]
        check_not_blank(pixels[index : index + 1], index)
    return pixels


def describe(value: object) -> str:
    """A few words for what a client sent in place of an image."""
    if value is None:
        return "null"
    shape = np.shape(value) if isinstance(value, (np.ndarray, list, tuple)) else None
    return type(value).__name__ if not shape else f"an array of shape {shape}"

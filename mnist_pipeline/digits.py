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
INK = 0.15  # a pixel brighter than this fraction of the brightest one above the paper belongs to the digit
MIN_CONTRAST = 32  # brightest pixel minus the paper, out of 255, below which an image holds no digit
# The rules that tell a digit from blank paper, a speck or a scratch, chosen from the data (docs/serving.md): the
# 10,000 MNIST test digits, as pixels and drawn on clean or unevenly lit paper, stand at least 4.4 times the bar
# out of their paper and span at least 0.47 of their image; blank paper under uneven light comes to at most 0.57
# of the bar, a speck or short scratch spans at most 0.18.
MIN_SIGNAL = 10  # the digit's brightest pixel over the paper, in the paper's grains (its noise's deviation), at least
MIN_SPAN = 0.25  # the ink's bounding box, its longer side as a fraction of the image's longer side, at least
INK_NOISE = 5  # a pixel this many noise levels over the paper may be ink; below, it is the paper's grain
PAPER_FIT_SIDE = 64  # the paper's shading is fitted on the image scaled down to this many pixels a side, at most
PAPER_FIT_ROUNDS = 3  # fits of the paper, each without the pixels the last one took for ink


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


def paper_surface(coefficients: np.ndarray, height: int, width: int) -> np.ndarray:
    """N x H x W: the papers that N x 6 `coefficients` weigh, of the smooth surfaces paper's shading is made of over
    a grid with corners at -1 and 1: 1, x, y, x^2, xy, y^2 (a gradient of light in any direction, a vignette, a page
    that curves). Summed by rows and columns: a 12-megapixel photo's six surfaces would take 290 MB."""
    y = np.linspace(-1, 1, height, dtype=np.float32)[None, :, None]
    x = np.linspace(-1, 1, width, dtype=np.float32)[None, None, :]
    c = coefficients.astype(np.float32)[:, :, None, None]
    return (c[:, 0] + c[:, 1] * x + c[:, 3] * x * x) + (c[:, 2] * y + c[:, 5] * y * y) + c[:, 4] * y * x


def paper_basis(height: int, width: int) -> np.ndarray:
    """6 x (H * W): each of `paper_surface`'s surfaces alone, for a fit on an image scaled down."""
    return paper_surface(np.eye(6, dtype=np.float32), height, width).reshape(6, -1)


def paper_fit(light_ink: np.ndarray) -> np.ndarray:
    """N x 6: each image's paper as weights of `paper_surface`'s surfaces, fitted by least squares to the pixels that are not ink.

    Ink is the bright minority (the images are light ink on dark paper here): the first fit takes the pixels not
    above the image's mean, each next one those the last fit calls paper (`paper_pixels`), so a digit never lifts
    its paper.
    """
    count, height, width = light_ink.shape
    basis = paper_basis(height, width)
    pairs = (basis[:, None] * basis[None]).reshape(36, -1).T  # every product of two surfaces, for the normal equations
    values = light_ink.reshape(count, -1)
    paper = values <= values.mean(1, keepdims=True)
    for _ in range(PAPER_FIT_ROUNDS):
        weights = paper.astype(np.float32)
        normal = (weights @ pairs).reshape(count, 6, 6) + 1e-3 * np.eye(6, dtype=np.float32)
        coefficients = np.linalg.solve(normal, ((weights * values) @ basis.T)[..., None])[..., 0]
        paper = paper_pixels(values - coefficients @ basis)
    return coefficients


def noise_level(residual: np.ndarray, paper: np.ndarray) -> np.ndarray:
    """Per image, the paper's grain: the standard deviation of its paper pixels' difference from the fitted paper,
    as sqrt(pi/2) times their mean absolute difference (the ink is left out, so no outlier spoils the mean)."""
    return 1.2533 * (np.abs(residual) * paper).sum(1) / np.maximum(paper.sum(1), 1)


def paper_pixels(residual: np.ndarray) -> np.ndarray:
    """N x P: each image's pixels that lie at most 2.5 noise levels above its fitted paper, the noise measured on
    those not above the image's mean (the ink is the bright minority)."""
    noise = noise_level(residual, residual <= residual.mean(1, keepdims=True))
    return residual <= np.maximum(2.5 * noise, 2.0)[:, None]


def paper_removed(light_ink: np.ndarray, lit: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """N x H x W light-ink images as how far each pixel stands over its paper (0 where below), and each image's
    grain; the paper's shading is fitted on the images scaled down to PAPER_FIT_SIDE and taken out at full size.

    `lit`: the images are inverted photos of dark ink on light paper. There the shading is the light falling on the
    page, which dims ink and paper alike, so the ink is measured as the share of the local light it takes
    (255 * (paper - pixel) / paper, in the photo's own shades): a digit reads the same in the bright and the dim
    part of the page.
    """
    count, height, width = light_ink.shape
    scale = min(1.0, PAPER_FIT_SIDE / max(height, width))
    if scale < 1:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = np.stack([np.asarray(Image.fromarray(i, mode="F").resize(size, Image.Resampling.BOX))
                          for i in light_ink])
    else:
        small = light_ink
    paper = paper_surface(paper_fit(small), height, width)
    residual = light_ink - paper
    if lit:
        residual *= 255 / np.maximum(255 - paper, MIN_CONTRAST)  # 255 - paper: the paper's shade in the photo
    flat = residual.reshape(count, -1)
    return np.clip(residual, 0, None), noise_level(flat, paper_pixels(flat))


def ink_mask(levels: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """N x H x W: the pixels of N images of ink levels that count as ink: at least INK of the image's brightest
    and INK_NOISE of its grain (paper texture and compression noise are not), beside another such pixel (a lone
    one is a sensor's hot pixel: a 12-megapixel photo has a few at 5 grains, which would stretch any box)."""
    marked = levels >= np.maximum(INK * levels.max((1, 2)), INK_NOISE * noise)[:, None, None]
    height, width = marked.shape[1:]
    edged = np.pad(marked, ((0, 0), (1, 1), (1, 1)))
    beside = np.zeros_like(marked)
    for row, col in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)):  # the 8 neighbours
        beside |= edged[:, row : row + height, col : col + width]
    return marked & beside


def ink_boxes(marked: np.ndarray) -> np.ndarray:
    """N x 4: the bounding box of each image's ink (top, bottom, left, right; bottom and right one past the end),
    all 0 where there is none."""
    rows, cols = marked.any(2), marked.any(1)
    top, left = rows.argmax(1), cols.argmax(1)
    bottom, right = rows.shape[1] - rows[:, ::-1].argmax(1), cols.shape[1] - cols[:, ::-1].argmax(1)
    return np.stack([top, bottom, left, right], 1) * rows.any(1)[:, None]  # no ink: an empty box


def no_digit(shades: tuple[float, float], peak: float, noise: float, box: np.ndarray, size: tuple[int, int]) -> str:
    """Why an image holds no digit, in words for its client; "" where it holds one.

    A digit stands clearly out of its paper's grain and spans a good part of its image. Blank paper under uneven
    light leaves only its grain once its smooth shading is out; a speck or a scratch spans too little for a digit.
    """
    (low, high), (height, width) = shades, size
    if high - low < MIN_CONTRAST:
        return f"no digit found: the image is one flat shade (grey {low:.0f} to {high:.0f})"
    if peak < max(MIN_CONTRAST, MIN_SIGNAL * noise):
        return (f"no digit found: the image is blank paper: its shading is smooth, and no mark stands out of it (at "
                f"most {peak:.0f} grey levels over a grain of {noise:.1f}; a digit stands at least {MIN_CONTRAST} "
                f"levels and {MIN_SIGNAL} grains out)")
    top, bottom, left, right = (int(edge) for edge in box)
    if max(bottom - top, right - left) < MIN_SPAN * max(height, width):
        return (f"no digit found: the only marks span {right - left}x{bottom - top} pixels of {width}x{height}, "
                f"too small for a digit (crop the image so that its digit spans at least a quarter of it)")
    return ""


def check_digits(pixels: np.ndarray, first: int = 0) -> None:
    """Refuse a pixel array with no digit in it, held to the rules an image file is (`no_digit`); `first` is the
    request's index of pixels[0]."""
    levels, noise = paper_removed(pixels.astype(np.float32))
    peaks, boxes = levels.max((1, 2)), ink_boxes(ink_mask(levels, noise))
    lows, highs = pixels.min((1, 2)), pixels.max((1, 2))
    for index, (low, high, peak, grain, box) in enumerate(zip(lows, highs, peaks, noise, boxes)):
        why = no_digit((low, high), peak, grain, box, (SIZE, SIZE))
        if why:
            raise DigitError(f"inputs[{first + index}]: {why}")


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
            image, where = on_paper(image.convert("RGBA"), where)
        gray = np.asarray(image.convert("L"), dtype=np.float32)
    except DigitError:
        raise
    except (OSError, ValueError, SyntaxError) as err:
        raise DigitError(f"{where}: a damaged {image.format} file ({' '.join(str(err).split())})") from None
    return mnist_style(gray, where)


def on_paper(image: Image.Image, where: str) -> tuple[Image.Image, str]:
    """A transparent image laid on paper that its drawing stands out of: a light drawing (a white digit on a
    transparent canvas) on black, a dark one on white; `where` grows the words that say so, for any refusal."""
    alpha = np.asarray(image.getchannel("A"), dtype=np.float32)
    if alpha.max() == 0:
        raise DigitError(f"{where}: no digit found: the image is transparent everywhere (its alpha channel is 0)")
    if alpha.min() == 255:  # an alpha channel, and nothing transparent
        return image, where
    shade = np.asarray(image.convert("L"), dtype=np.float32)
    light = float((shade * alpha).sum() / alpha.sum()) > 127  # the drawn part's shade, where it is drawn
    paper = Image.new("RGBA", image.size, "black" if light else "white")
    drawing = f"a {'light' if light else 'dark'} drawing on a transparent background (its alpha channel)"
    return Image.alpha_composite(paper, image), f"{where}: {drawing}"


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
    """A grayscale picture of one digit made as MNIST's were: its paper's shading taken out, white on black, fitted
    into 20x20, centred by mass; refused in one line where it holds no digit (`no_digit`)."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    shades = (float(gray.min()), float(gray.max()))
    light_paper = bool(np.median(border) > 127)
    if light_paper:  # dark ink on light paper: MNIST's digits are light on dark
        gray = 255 - gray
    levels, noise = paper_removed(gray[None], lit=light_paper)
    marked = ink_mask(levels, noise)
    (top, bottom, left, right), peak = ink_boxes(marked)[0], float(levels.max())
    why = no_digit(shades, peak, float(noise[0]), (top, bottom, left, right), gray.shape)
    if why:
        raise DigitError(f"{where}: {why}")
    ink = np.where(marked[0], levels[0] * (255 / peak), 0).astype(np.float32)
    digit = ink[top:bottom, left:right]
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
        check_digits(pixels)
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
        check_digits(pixels[index : index + 1], index)
    return pixels


def describe(value: object) -> str:
    """A few words for what a client sent in place of an image."""
    if value is None:
        return "null"
    shape = np.shape(value) if isinstance(value, (np.ndarray, list, tuple)) else None
    return type(value).__name__ if not shape else f"an array of shape {shape}"

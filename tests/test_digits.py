"""The served model's preprocessing on its own: pixel arrays checked, image files made as MNIST's, bad items refused."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from mnist_pipeline import digits
from mnist_pipeline.digits import DigitError, check_pixels, decode_image, deskew, read_batch, to_tensor
from tests.conftest import REPO

EXAMPLES = REPO / "examples" / "digits"
# examples/digits/0_7.png holds the first MNIST test image exactly as MNIST stores it.
SEVEN = np.array(Image.open(EXAMPLES / "0_7.png"))


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def test_to_tensor_normalizes_as_torchvision_does() -> None:
    """The reference: torchvision's ToTensor then Normalize with the same mean and standard deviation."""
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    expected = torch.stack([TF.normalize(TF.to_tensor(i), [digits.PIXEL_MEAN], [digits.PIXEL_STD]) for i in images])
    assert torch.allclose(to_tensor(images), expected, atol=1e-6)


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(image.shape)
    return float((rows * image).sum() / image.sum()), float((cols * image).sum() / image.sum())


def test_deskew_shears_a_slanted_stroke_upright_and_centres_it() -> None:
    stroke = np.zeros((1, 28, 28), np.uint8)
    for row in range(4, 24):  # leaning right as it rises: one column per two rows, off centre
        stroke[0, row, 9 + (24 - row) // 2 : 11 + (24 - row) // 2] = 255
    upright = deskew(stroke)[0]
    ink_cols = [np.flatnonzero(upright[row] > 127) for row in range(6, 22)]
    assert all(len(cols) > 0 for cols in ink_cols)
    assert max(cols.mean() for cols in ink_cols) - min(cols.mean() for cols in ink_cols) <= 1.0  # was 8 columns
    assert centre_of_mass(upright) == pytest.approx((14.0, 14.0), abs=0.3)


def test_deskew_keeps_an_upright_centred_digit_and_blank_images() -> None:
    bar = np.zeros((2, 28, 28), np.uint8)
    bar[0, 6:23, 13:16] = 200  # upright, its centre of mass at (14, 14)
    out = deskew(bar)
    assert out.dtype == np.uint8 and out.shape == bar.shape
    assert np.array_equal(out[0], bar[0])
    assert not out[1].any()
    flat = np.zeros((1, 28, 28), np.uint8)
    flat[0, 14, 8:21] = 255  # one row of ink: no vertical spread to measure a slant by
    assert np.array_equal(deskew(flat), flat)


def test_deskew_is_the_same_image_by_image_as_in_a_batch() -> None:
    sevens = np.stack([SEVEN, np.roll(SEVEN, 3, axis=1), SEVEN[:, ::-1]] * 4)
    one_by_one = np.concatenate([deskew(image[None]) for image in sevens])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(digits, "DESKEW_CHUNK", 5)  # batches split across chunks
        batched = deskew(sevens).astype(int)
    # Equal up to the rounding of a value on .5 (a matrix product's sum order can depend on the batch size).
    assert np.abs(batched - one_by_one).max() <= 1
    assert similarity(deskew(SEVEN[None])[0], SEVEN) > 0.8  # a real digit stays itself


def test_whole_numbers_0_255_of_any_numeric_type_are_pixels() -> None:
    for dtype in (np.uint8, np.int64, np.float32, np.float64, object):
        pixels = check_pixels(SEVEN[None].astype(dtype))
        assert pixels.dtype == np.uint8 and np.array_equal(pixels, SEVEN[None]), dtype


@pytest.mark.parametrize(("values", "message"), [
    (SEVEN[None] / 255.0, "pixels must be whole numbers 0-255"),  # scaled to 0-1 by hand: refused, not misread
    (to_tensor(SEVEN[None]).numpy()[:, 0], "pixels must be whole numbers 0-255"),  # normalized by hand
    (np.full((1, 28, 28), 300), "got 300 at image 0, row 0, column 0"),
    (np.full((1, 28, 28), -1.0), "got -1 at image 0"),
    (np.full((1, 28, 28), np.nan), "got nan at image 0"),
    (np.zeros((1, 28, 27)), "expected N images of 28x28 pixels, got an array of shape (1, 28, 27)"),
    (np.zeros((2, 1, 28, 28), np.float32), "got an array of shape (2, 1, 28, 28)"),  # the old input
    (np.zeros((1, 28, 28), bool), "expected numbers 0-255, got bool"),
    (np.full((1, 28, 28), "seven", dtype=object), "expected numbers 0-255 (JSON numbers, not text or true/false), "
                                                  "got str"),
])
def test_bad_pixels_are_refused_in_one_line(values: np.ndarray, message: str) -> None:
    with pytest.raises(DigitError) as info:
        check_pixels(values)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("value", "kind"), [("255", "str"), (" 7 ", "str"), ("1e2", "str"), (True, "bool")])
def test_pixels_that_are_not_numbers_are_refused_as_sent(value: object, kind: str) -> None:
    # numpy would read each as a number (255, 7, 100, 1); a client that sends them has a bug worth hearing about.
    message = f"inputs[1]: expected numbers 0-255 (JSON numbers, not text or true/false), got {kind}"
    sent = SEVEN.tolist()
    sent[5][5] = value
    with pytest.raises(DigitError, match=re.escape(message)):
        read_batch([SEVEN.tolist(), sent])  # as JSON gives it: lists
    as_objects = np.array([SEVEN, SEVEN], dtype=object)
    as_objects[1, 5, 5] = value
    with pytest.raises(DigitError, match=re.escape(message.replace("inputs[1]", "pixels"))):
        read_batch(as_objects)  # as MLflow gives a whole batch: one object array


@pytest.mark.parametrize("shade", [0, 255, 128])
def test_a_blank_pixel_array_is_refused_as_a_blank_image_is(shade: int) -> None:
    blank = np.full((28, 28), shade, np.uint8)
    message = f"inputs[1]: no digit found: the image is one flat shade (grey {shade} to {shade})"
    with pytest.raises(DigitError, match=re.escape(message)):
        read_batch(np.stack([SEVEN, blank]))
    with pytest.raises(DigitError, match=re.escape(message)):
        read_batch([SEVEN.tolist(), blank.tolist()])


def test_base64_with_line_breaks_is_refused_saying_so() -> None:
    wrapped = base64.encodebytes((EXAMPLES / "0_7.png").read_bytes()).decode()  # what plain `base64` prints
    assert "\n" in wrapped.strip()
    with pytest.raises(DigitError, match=re.escape("inputs[0]: base64 text with line breaks inside")):
        read_batch([wrapped])


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped() -> None:
    wide = Image.fromarray(np.array([[0, 200, 255, 256, 1000, 30000, 65535]], np.uint16))
    assert wide.mode == "I;16"
    assert np.asarray(digits.eight_bit(Image.open(io.BytesIO(encode(wide))))).tolist() == [[0, 1, 1, 1, 4, 117, 255]]


@pytest.mark.parametrize("polarity", ["light on dark", "dark on light"])
def test_a_16_bit_png_is_the_same_digit_as_its_8_bit_original(polarity: str) -> None:
    big = np.asarray(Image.fromarray(SEVEN).resize((112, 112), Image.Resampling.BICUBIC)).astype(np.uint16) * 257
    wide = Image.fromarray(big if polarity == "light on dark" else 65535 - big)
    assert wide.mode == "I;16"
    pixels = decode_image(encode(wide))
    assert_mnist_shaped(pixels)
    assert similarity(pixels, SEVEN) > 0.9


def assert_mnist_shaped(pixels: np.ndarray) -> None:
    """As MNIST made its digits: 28x28, the digit's box 20 pixels on its longer side, its centre of mass mid-image."""
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    rows, cols = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (20, 21)  # antialiasing may spill into one more
    centre = centre_of_mass(pixels)
    assert np.allclose(centre, 14, atol=0.5), centre
    assert pixels[0].max() == pixels[-1].max() == pixels[:, 0].max() == pixels[:, -1].max() == 0  # black margins


def test_an_mnist_digit_as_png_comes_back_as_itself() -> None:
    pixels = decode_image((EXAMPLES / "0_7.png").read_bytes())
    assert_mnist_shaped(pixels)
    assert similarity(pixels, SEVEN) > 0.99


@pytest.mark.parametrize("variant", ["dark ink on paper, large, off-centre", "JPEG photo of gray ink",
                                     "RGB", "transparent canvas", "rotated by its EXIF tag"])
def test_image_files_of_any_size_and_polarity_become_the_same_digit(variant: str) -> None:
    big = Image.fromarray(SEVEN).resize((140, 140), Image.Resampling.BICUBIC)
    if variant == "dark ink on paper, large, off-centre":
        page = Image.new("L", (300, 200), 255)
        page.paste(Image.fromarray(255 - np.asarray(big)), (150, 10))
        data = encode(page)
    elif variant == "JPEG photo of gray ink":
        ink = Image.fromarray((230 - np.asarray(big) * (190 / 255)).astype(np.uint8))
        page = Image.new("L", (200, 260), 230)
        page.paste(ink, (30, 60))
        data = encode(page.convert("RGB"), "JPEG", quality=80)
    elif variant == "RGB":
        data = encode(Image.merge("RGB", [big] * 3))
    elif variant == "transparent canvas":
        canvas = Image.new("RGBA", big.size, (0, 0, 0, 0))
        canvas.putalpha(big)  # black ink, drawn where alpha is
        data = encode(canvas)
    else:
        exif = Image.Exif()
        exif[0x0112] = 6  # the camera turned: shown rotated 90 degrees clockwise
        data = encode(big.rotate(90, expand=True).convert("RGB"), "JPEG", quality=95, exif=exif)
    pixels = decode_image(data)
    assert_mnist_shaped(pixels)
    assert similarity(pixels, SEVEN) > 0.9


@pytest.mark.parametrize(("data", "message"), [
    (b"hello world", "not a PNG or JPEG file (11 bytes starting b'hello wo')"),
    (encode(Image.fromarray(SEVEN), "GIF"), "not a PNG or JPEG file"),
    (encode(Image.fromarray(SEVEN))[:60], "a damaged PNG file"),
    (encode(Image.new("L", (50, 50), 200)), "no digit found: the image is one flat shade"),
    (encode(Image.new("L", (5000, 4000), 0)), "5000x4000 pixels is over the limit of 16.7 megapixels"),
    (encode(Image.new("1", (14000, 14000), 0)), "over the limit of 16.7 megapixels"),  # past Pillow's own limit
])
def test_bad_image_files_are_refused_in_one_line(data: bytes, message: str) -> None:
    with pytest.raises(DigitError) as info:
        decode_image(data, "inputs[3]")
    assert str(info.value).startswith("inputs[3]: ") and message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_a_batch_mixes_pixels_and_files_given_as_bytes_or_base64() -> None:
    png = (EXAMPLES / "0_7.png").read_bytes()
    batch = read_batch([SEVEN.tolist(), png, base64.b64encode(png).decode(), np.str_(base64.b64encode(png).decode())])
    assert batch.shape == (4, 28, 28) and batch.dtype == np.uint8
    assert np.array_equal(batch[0], SEVEN)
    assert all(np.array_equal(batch[i], decode_image(png)) for i in (1, 2, 3))
    assert np.array_equal(read_batch(np.stack([SEVEN] * 3)), np.stack([SEVEN] * 3))  # the fast path, as is


@pytest.mark.parametrize(("batch", "message"), [
    ([], "inputs: an empty batch; send at least one image"),
    (np.zeros((0, 28, 28), np.uint8), "inputs: an empty batch"),
    ([b""] * (digits.MAX_BATCH + 1), "inputs: 10001 images is over the limit of 10,000 a request; split the batch"),
    ("iVBORw0KGgo=", "inputs: expected a list of images (28x28 pixel arrays or base64 PNG/JPEG files), got str"),
    ([SEVEN.tolist(), "not base64!"], "inputs[1]: text that is not base64"),
    ([SEVEN.tolist(), None], "inputs[1]: expected 28x28 pixels or a base64 PNG/JPEG file, got null"),
    ([[[1, 2], [3]]], "inputs[0]: expected 28x28 pixels, got rows of different lengths"),
    ([SEVEN.ravel().tolist()],
     "inputs[0]: expected 28x28 pixels or a base64 PNG/JPEG file, got an array of shape (784,)"),
])
def test_bad_batches_are_refused_in_one_line(batch: object, message: str) -> None:
    with pytest.raises(DigitError) as info:
        read_batch(batch)
    assert str(info.value).startswith(message), str(info.value)


def test_example_files_are_mnist_shaped_after_preprocessing() -> None:
    files = sorted(EXAMPLES.iterdir())
    assert {p.suffix for p in files} == {".png", ".jpg"} and len(files) >= 4
    for path in files:
        assert_mnist_shaped(decode_image(path.read_bytes(), path.name))


# ---- what is not a digit -------------------------------------------------------------------------------------------
LIGHTS = ("left to right", "top to bottom", "corner to corner", "vignette")


def uneven_paper(light: str, grain: float, size: int = 300, shades: tuple[int, int] = (200, 250),
                 seed: int = 0) -> np.ndarray:
    """Blank paper photographed under uneven light, as floats: grey shades[0] to shades[1] across it (for a
    vignette, bright in the middle, dark in the corners), with sensor noise of standard deviation `grain`."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    across = {"left to right": x, "top to bottom": y, "corner to corner": (x + y) / 2,
              "vignette": 1 - 2 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)}[light]
    noise = np.random.default_rng(seed).normal(0, grain, (size, size))
    return shades[0] + (shades[1] - shades[0]) * across + noise


def as_file(page: np.ndarray, fmt: str) -> bytes:
    gray = Image.fromarray(np.clip(np.rint(page), 0, 255).astype(np.uint8))
    return encode(gray, fmt, **({"quality": 75} if fmt == "JPEG" else {}))


def non_digit_files() -> dict[str, bytes]:
    """Image files with no digit: blank paper under each light, with and without grain, as PNG and as JPEG (its
    artefacts too), and specks and short scratches on paper."""
    files = {}
    for light in LIGHTS:
        for grain in (0, 2, 4, 8):
            for fmt in ("PNG", "JPEG"):
                files[f"blank paper, {light}, grain {grain}, {fmt}"] = as_file(uneven_paper(light, grain), fmt)
    for side in (2, 4, 6, 8):  # a speck of grey 100 on paper of grey 240
        page = uneven_paper("left to right", 2, shades=(240, 240))
        page[150 : 150 + side, 100 : 100 + side] = 100
        for fmt in ("PNG", "JPEG"):
            files[f"a {side}x{side} speck, {fmt}"] = as_file(page, fmt)
    for length in (5, 10, 15):  # a scratch two pixels wide, slanting down
        page = uneven_paper("left to right", 4)
        for step in range(length):
            page[120 + step, 80 + step // 2 : 82 + step // 2] = 90
        files[f"a {length}-pixel scratch, PNG"] = as_file(page, "PNG")
    return files


def non_digit_arrays() -> dict[str, np.ndarray]:
    """MNIST-style pixel arrays (light on black) with no digit: smooth shading, grain, specks, short scratches."""
    arrays = {}
    for light in LIGHTS:
        for grain in (0, 3):
            arrays[f"shading {light}, grain {grain}"] = uneven_paper(light, grain, 28, (0, 60))
    for side in (1, 2, 3, 4):
        speck = np.zeros((28, 28))
        speck[12 : 12 + side, 9 : 9 + side] = 255
        arrays[f"a {side}x{side} speck"] = speck
    for length in (3, 5):
        scratch = np.zeros((28, 28))
        scratch[np.arange(10, 10 + length), np.arange(6, 6 + length)] = 200
        arrays[f"a {length}-pixel scratch"] = scratch
    return {name: np.clip(np.rint(a), 0, 255).astype(np.uint8) for name, a in arrays.items()}


def test_image_files_with_no_digit_are_refused_in_one_line_saying_what_was_seen() -> None:
    for name, data in non_digit_files().items():
        with pytest.raises(DigitError) as info:
            read_batch([data])
        message = str(info.value)
        what = "blank paper" if name.startswith("blank") else "span"
        assert message.startswith("inputs[0]: no digit found: ") and "\n" not in message, (name, message)
        assert what in message or "one flat shade" in message, (name, message)


def test_the_uneven_blank_paper_and_the_speck_of_the_issue_say_what_they_are() -> None:
    for fmt in ("PNG", "JPEG"):
        with pytest.raises(DigitError, match=r"^inputs\[0\]: no digit found: the image is blank paper: its shading "
                                             r"is smooth"):
            read_batch([as_file(uneven_paper("left to right", 4), fmt)])
    speck = uneven_paper("left to right", 0, shades=(240, 240))
    speck[100:104, 200:204] = 100
    with pytest.raises(DigitError, match=r"^inputs\[0\]: no digit found: the only marks span 4x4 pixels of 300x300, "
                                         r"too small for a digit"):
        read_batch([as_file(speck, "PNG")])


def test_pixel_arrays_with_no_digit_are_refused_as_image_files_are() -> None:
    for name, pixels in non_digit_arrays().items():
        with pytest.raises(DigitError, match=r"^inputs\[1\]: no digit found: ") as info:
            read_batch(np.stack([SEVEN, pixels]))
        assert "\n" not in str(info.value), name
        with pytest.raises(DigitError, match=r"^inputs\[1\]: no digit found: "):
            read_batch([SEVEN.tolist(), pixels.tolist()])


def drawn_dark(digit: np.ndarray, page: np.ndarray) -> np.ndarray:
    """An MNIST digit drawn in dark ink over the middle of a page: the ink takes up to 80% of the paper's light."""
    size = page.shape[0] * 3 // 4
    ink = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    top = (page.shape[0] - size) // 2
    page = page.copy()
    page[top : top + size, top : top + size] *= 1 - 0.8 * ink / 255
    return page


@pytest.mark.parametrize("light", LIGHTS)
def test_a_digit_under_uneven_light_is_the_digit_on_clean_paper(light: str) -> None:
    clean = decode_image(as_file(drawn_dark(SEVEN, np.full((300, 300), 240.0)), "PNG"))
    for fmt in ("PNG", "JPEG"):
        uneven = decode_image(as_file(drawn_dark(SEVEN, uneven_paper(light, 4)), fmt))
        assert_mnist_shaped(uneven)
        assert similarity(uneven, clean) > 0.95 and similarity(uneven, SEVEN) > 0.9, (light, fmt)


def test_a_white_digit_on_a_transparent_canvas_is_read() -> None:
    big = Image.fromarray(SEVEN).resize((140, 140), Image.Resampling.BICUBIC)
    canvas = Image.new("RGBA", big.size, (255, 255, 255, 0))  # white, and transparent but where the digit is
    canvas.putalpha(big)
    pixels = decode_image(encode(canvas))
    assert_mnist_shaped(pixels)
    assert similarity(pixels, SEVEN) > 0.9


@pytest.mark.parametrize(("alpha", "message"), [
    (0, "no digit found: the image is transparent everywhere (its alpha channel is 0)"),
    (128, "a light drawing on a transparent background (its alpha channel): no digit found: the image is one flat "
          "shade (grey 128 to 128)"),
])
def test_a_transparent_image_with_no_digit_is_refused_naming_its_alpha_channel(alpha: int, message: str) -> None:
    with pytest.raises(DigitError) as info:
        decode_image(encode(Image.new("RGBA", (60, 60), (255, 255, 255, alpha))), "inputs[0]")
    assert str(info.value) == f"inputs[0]: {message}"

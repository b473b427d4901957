"""`mnist-pipeline predict`: classify photos or scans of digits with a run's exported model.

MNIST digits are white strokes on black, scaled so the digit fits a 20x20 box and centred by its centre of mass in a
28x28 image; any image is brought into that form first, whichever way round its colours are.

Images come from cameras, scanners and drawing programs, and some are hostile. Each file is checked to be a regular
file of bounded size before it is opened (a FIFO would block for ever, /dev/zero never ends); its pixel count is
checked from the header before any pixel is decoded (a PNG of a few KB can declare 100000x100000 pixels); and any
decoder failure makes that one image bad, not the batch.
"""

from __future__ import annotations

import os
import stat
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from pipeline.run_folder import locate_run
from stages.common import storage
from stages.common.errors import BadInputError
from stages.evaluate import EXPORTED_ENSEMBLE

if TYPE_CHECKING:
    from PIL.Image import Image

MAX_PIXELS = 64_000_000  # a 50-megapixel phone photo fits; a decompression bomb does not
MAX_IMAGE_BYTES = 256 * 2**20  # an uncompressed 64-megapixel RGB TIFF is 192 MiB
WORKING_SIDE = 2048  # larger images are reduced to this before the float maths: a digit needs far fewer pixels
# formats cameras, scanners and drawing programs write; not EPS and the like, for which Pillow runs Ghostscript
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP", "PPM")  # JPEG includes MPO, as phones write
DIGIT_INPUTS = {(28, 28), (28, 28, 1), (1, 28, 28), (784,)}  # the shapes a model may take one 28x28 digit in
NUM_CLASSES = 10
WHITE, BLACK = 255.0, 0.0


@dataclass(frozen=True)
class Prediction:
    image: str
    digit: int
    probability: float
    probabilities: list[float]


@dataclass(frozen=True)
class _Pixels:
    """An image as greyscale 0..255 and, where it has transparency, opacity 0..1."""

    grey: np.ndarray
    alpha: np.ndarray | None


def printable(name: str) -> str:
    """A file name as one safe line: bytes that are not UTF-8 as \\xNN, control characters (a newline, a terminal
    escape) escaped, so a name can neither break the one-line-per-image output nor fail to print."""
    try:
        raw = name.encode("utf-8", "surrogateescape")  # how Python holds undecodable bytes of argv
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def find_model(run_or_model: str, root: str, *, ensemble: bool | None = None) -> str:
    """A .keras file, a run folder or URI, or a run id under `root` → the model's location: with `ensemble` True the
    run's top-k ensemble (model/ensemble.keras, made when evaluate.ensemble_top_k was set), with False its best
    single model, with None whichever of the two did better on the validation split (metrics.json says).

    Raises:
      BadInputError: nothing there holds a model, or it is not a regular file; `ensemble` with a .keras file.
      DamagedFile: the run's metrics.json cannot be read (to choose between the two).
    """
    if run_or_model.endswith(".keras"):
        if ensemble:
            raise BadInputError(f"{printable(run_or_model)}: --ensemble picks a run's ensemble; give the run, or the "
                                ".keras file without --ensemble")
        model = run_or_model
    elif ensemble is None:
        run = locate_run(run_or_model, root)
        preferred = storage.exists(run.metrics_file) and _ensemble_preferred(run)
        model = storage.join(run.model_dir, EXPORTED_ENSEMBLE) if preferred else run.model_file
    elif ensemble:
        run = locate_run(run_or_model, root)
        model = storage.join(run.model_dir, EXPORTED_ENSEMBLE)
        if not storage.exists(model) and storage.exists(run.model_file):
            raise BadInputError(f"run {run_or_model!r} has no ensemble ({printable(model)} is missing): it was "
                                "evaluated without evaluate.ensemble_top_k")
    else:
        model = locate_run(run_or_model, root).model_file
    if storage.exists(model):
        if not storage.is_uri(model):  # a FIFO would block the load for ever, a folder fail obscurely
            try:
                _require_regular_file(os.stat(model), printable(model), "a model file")
            except OSError as error:
                raise BadInputError(f"{printable(model)}: cannot read ({error.strerror or error})") from None
        return model
    raise BadInputError(
        f"no model at {run_or_model!r}: give a model.keras file, a run folder, or the id of a finished run in {root}"
    )


def _ensemble_preferred(run) -> bool:
    """Whether the run's ensemble did better than its best single model on the validation split."""
    from pipeline.run_files import read_metrics

    ensemble = read_metrics(run).ensemble
    return ensemble is not None and ensemble.preferred


# ---- reading a file that may be anything --------------------------------------------------------------------------


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _require_regular_file(status: os.stat_result, shown: str, what: str, max_bytes: int | None = None) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise BadInputError(f"{shown}: is {_file_kind(status.st_mode)}, not {what}")
    if max_bytes is not None and status.st_size > max_bytes:
        raise BadInputError(f"{shown}: {status.st_size / 2**20:.0f} MiB, more than the {max_bytes // 2**20} MiB "
                            f"{what} can be")


@contextmanager
def _open_regular_file(path: str, shown: str, what: str, max_bytes: int) -> Iterator[IO[bytes]]:
    """Opens `path` for reading only if it is a regular file of at most `max_bytes`.

    The check comes before the open (opening a FIFO blocks until a writer comes; opening a device can have effects),
    and again on the open file, in case the name was pointed elsewhere in between; O_NONBLOCK keeps that second
    open from blocking.
    """
    try:
        _require_regular_file(os.stat(path), shown, what, max_bytes)
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise BadInputError(f"{shown}: not found") from None
    except OSError as error:  # permission denied, a name too long, a loop of symbolic links...
        raise BadInputError(f"{shown}: cannot open ({error.strerror or error})") from None
    with os.fdopen(descriptor, "rb") as file:
        _require_regular_file(os.fstat(descriptor), shown, what, max_bytes)
        yield file


# ---- images --------------------------------------------------------------------------------------------------------


def load_digit(path: str) -> np.ndarray:
    """Reads a photo or scan of one digit (see `IMAGE_FORMATS`; any size up to `MAX_PIXELS`, colour or grey, dark on
    light or light on dark) as a 28x28 uint8 MNIST digit.

    What cameras, scanners and drawing programs produce is read as it is meant to look:
      - EXIF orientation is applied (a phone photo taken sideways is upright);
      - 16-bit and 32-bit images are scaled by the range their values use, never clipped: a full 16-bit range is
        divided by 257, a 12-bit scan's 0..4095 by 4095/255 (see `_to_0_255`);
      - CMYK, palette, 1-bit and other modes go through Pillow's conversion to luminance;
      - of a multi-frame TIFF or GIF, the first frame is read;
      - transparency (RGBA, LA, a palette or a colour key with transparency) is composited onto paper, see
        `_on_paper`.

    Raises:
      BadInputError: the file is missing, not a regular file, too large, not an image, truncated or corrupt, or holds
        no digit; the message names the file.
    """
    shown = printable(path)
    if not os.path.lexists(path):
        raise BadInputError(f"image not found: {shown}")
    try:
        with _open_regular_file(path, shown, "an image file", MAX_IMAGE_BYTES) as file:
            pixels = _decode(file, shown)
        return _on_paper(pixels, shown)
    except MemoryError:
        raise BadInputError(f"{shown}: too large to process in the memory available") from None


def _decode(file: IO[bytes], shown: str) -> _Pixels:
    """Decodes the first frame of the image in `file`, bounded in pixels, into grey and opacity arrays."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    with warnings.catch_warnings():
        # Pillow only warns about images between its two limits, and would then decode them
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(file, formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            raise BadInputError(f"{shown}: not a readable image ({_unsupported(file)})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise BadInputError(f"{shown}: more pixels than a photo of a digit can need, refused before decoding "
                                f"({_reason(error)})") from None
        except Exception as error:  # a malformed header: Pillow's plugins raise SyntaxError, struct.error, ...
            raise BadInputError(f"{shown}: not a readable image ({_reason(error)})") from None
    with image:
        width, height = image.size
        if width * height > MAX_PIXELS:  # from the header alone: nothing is decoded yet
            raise BadInputError(f"{shown}: {width}x{height} pixels, more than the {MAX_PIXELS // 10**6} megapixels "
                                "a photo of a digit can need, refused before decoding")
        if width * height == 0:
            raise BadInputError(f"{shown}: an image of {width}x{height} pixels")
        try:
            image.draft(None, (WORKING_SIDE, WORKING_SIDE))  # a large JPEG decodes at 1/2, 1/4 or 1/8 scale
            image.load()
            try:
                ImageOps.exif_transpose(image, in_place=True)
            except Exception:  # corrupt EXIF: the pixels are good, only their orientation is unknown
                pass
            return _pixels(image)
        except (BadInputError, MemoryError):
            raise
        except Exception as error:  # truncated or corrupt pixel data: OSError, ValueError, zlib.error, ...
            raise BadInputError(f"{shown}: not a readable image ({_reason(error)})") from None


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unsupported(file: IO[bytes]) -> str:
    file.seek(0)
    head = file.read(16)
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc", b"avif"):
        return "a HEIC/HEIF or AVIF photo: export it as JPEG or PNG"
    return "not a PNG, JPEG, GIF, TIFF, BMP, WebP or PNM file"


def _pixels(image: Image) -> _Pixels:
    """Any Pillow mode → grey 0..255 and opacity 0..1 (None where the image is opaque), reduced to `WORKING_SIDE`."""
    grey, alpha = _grey_and_alpha(image)
    factor = -(-max(grey.size) // WORKING_SIDE)
    if factor > 1:  # box-averaging, as cheap as it gets, before anything becomes float32
        grey = grey.reduce(factor)
        alpha = alpha.reduce(factor) if alpha is not None else None
    values = np.asarray(grey)
    return _Pixels(
        _to_0_255(values, grey.mode),
        np.asarray(alpha, dtype=np.float32) / 255.0 if alpha is not None else None,
    )


def _grey_and_alpha(image: Image) -> tuple[Image, Image | None]:
    """The image as one band of mode L, I or F, and its opacity as mode L (or None)."""
    key = image.info.get("transparency")  # a colour key: the one value (or palette entries) shown as transparent
    mode = image.mode
    if mode in ("P", "PA"):  # the palette's colours, and its entries' transparency
        image = image.convert("RGBA" if mode == "PA" or key is not None else "L")
        key = None
    elif mode == "1":
        image = image.convert("L")
    elif mode.startswith("I;16"):
        image = image.convert("I")  # I;16 → L would clip everything above 255 to white
    elif mode in ("La", "RGBa"):  # premultiplied alpha
        image = image.convert(mode.upper())
    elif mode == "LAB":
        image = image.getchannel("L")  # Pillow converts LAB to nothing; L is its lightness
    bands = image.getbands()
    alpha = image.getchannel("A") if "A" in bands else _key_mask(image, key)
    if image.mode not in ("L", "I", "F"):
        image = image.convert("L")  # RGB, RGBA, LA, CMYK, YCbCr, HSV: luminance, ignoring any alpha
    return image, alpha


def _key_mask(image: Image, key: object) -> Image | None:
    """Opacity of an image with a transparent colour key (PNG tRNS of a grey or RGB image), as mode L."""
    from PIL import Image as PILImage

    values = np.asarray(image)
    if isinstance(key, int) and values.ndim == 2:
        opaque = values != key
    elif isinstance(key, tuple) and values.ndim == 3 and len(key) == values.shape[2]:
        opaque = np.any(values != np.asarray(key, values.dtype), axis=2)
    else:
        return None
    return PILImage.fromarray(opaque.astype(np.uint8) * 255, "L")


def _to_0_255(values: np.ndarray, mode: str) -> np.ndarray:
    """Pixel values → float32 0..255 by the range they use, never clipping.

    8-bit values are kept. Up to 16 bits, the values are scaled by the bit depth their maximum needs: a full 16-bit
    image (max > 32767) is divided by 257, a 12-bit scan (max <= 4095) by 4095/255, so paper stays light whatever the
    sensor's depth. A float image in 0..1 is multiplied by 255. Anything else (negative, beyond 16 bits) is stretched
    from its minimum to its maximum.
    """
    if mode == "L":
        return values.astype(np.float32)
    values = values.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.all():
        values = np.where(finite, values, values[finite].min() if finite.any() else 0.0)
    low, high = float(values.min()), float(values.max())
    if mode == "F" and low >= 0 and high <= 1:
        return values * 255.0
    if low >= 0 and high <= 255:
        return values
    if low >= 0 and high <= 65535:
        return values * (255.0 / (2 ** int(np.ceil(high)).bit_length() - 1))
    return (values - low) * (255.0 / (high - low))


def _on_paper(pixels: _Pixels, where: str) -> np.ndarray:
    """The digit, its transparent parts composited onto paper.

    The paper is white: transparency in a scan or a drawing stands for the sheet, and a dark pen on white is the
    common case (a transparent background left black, as RGBA files store it, would otherwise read as black ink on
    black). Only when nothing then stands out (a white digit drawn on a transparent canvas, or a digit cut out of an
    opaque sheet) is black paper used instead. Since `to_mnist` reads either polarity, the paper only has to contrast
    with the ink.
    """
    if pixels.alpha is None or pixels.alpha.min() == 1.0:
        return to_mnist(pixels.grey, where=where)
    try:
        return to_mnist(_composite(pixels, WHITE), where=where)
    except BadInputError:
        return to_mnist(_composite(pixels, BLACK), where=where)


def _composite(pixels: _Pixels, paper: float) -> np.ndarray:
    assert pixels.alpha is not None
    return pixels.grey * pixels.alpha + paper * (1.0 - pixels.alpha)


def to_mnist(grey: np.ndarray, *, where: str = "image") -> np.ndarray:
    """A greyscale image (h, w) in 0..255 → MNIST's form: ink bright on black, digit in a 20x20 box, centre of mass
    at the centre of 28x28."""
    from PIL import Image

    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    ink = 255.0 - grey if np.median(border) > 127 else grey.copy()  # dark digit on light paper: invert
    ink -= np.median(np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]]))  # background to 0
    ink = np.clip(ink, 0, None)
    if ink.max() < 32:  # nothing stands out from the background
        raise BadInputError(f"{where}: no digit found (the image is almost uniform)")
    ink *= 255.0 / ink.max()
    rows, columns = np.nonzero(ink > 0.25 * 255)
    digit = ink[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    scale = 20.0 / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    digit = np.asarray(Image.fromarray(digit.astype(np.uint8)).resize(size, Image.LANCZOS), dtype=np.float32)
    canvas = np.zeros((28, 28), np.float32)
    top, left = (28 - digit.shape[0]) // 2, (28 - digit.shape[1]) // 2
    canvas[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    # MNIST centres the centre of mass, not the bounding box
    total = canvas.sum()
    centre_y = (canvas.sum(axis=1) * np.arange(28)).sum() / total
    centre_x = (canvas.sum(axis=0) * np.arange(28)).sum() / total
    canvas = _shift(canvas, round(13.5 - centre_y), round(13.5 - centre_x))
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _shift(image: np.ndarray, down: int, right: int) -> np.ndarray:
    shifted = np.zeros_like(image)
    height, width = image.shape
    source = image[max(0, -down) : height - max(0, down), max(0, -right) : width - max(0, right)]
    shifted[max(0, down) : max(0, down) + source.shape[0], max(0, right) : max(0, right) + source.shape[1]] = source
    return shifted


# ---- the model -----------------------------------------------------------------------------------------------------


def predict(
    model_location: str, digits: Mapping[str, np.ndarray] | Sequence[tuple[str, np.ndarray]]
) -> list[Prediction]:
    """Classifies each image (name -> 28x28 digit from `load_digit`, as a mapping or pairs) with the model at
    `model_location`.

    Raises:
      BadInputError: the file is not a Keras model this code can load (safe mode: no code from the file runs), or
        its model does not take one 28x28 digit or does not give 10 classes; the message names the file.
    """
    pairs = list(digits.items()) if isinstance(digits, Mapping) else list(digits)
    shown = printable(model_location)
    with storage.local_copy(model_location) as model_file:
        _require_keras_archive(model_file, shown)  # before TensorFlow's import: a wrong file is told at once
        with _quiet_native_stderr():  # TensorFlow's C++ start-up lines: noise for a one-line answer
            import keras

            try:
                model = keras.models.load_model(model_file, safe_mode=True, compile=False)
            except Exception as error:  # Keras raises ValueError, OSError, zipfile errors... for a bad file
                raise BadInputError(f"{shown}: not a Keras model it can load ({_reason(error)})") from None
    input_shape = _digit_input_shape(model, shown)
    with _quiet_native_stderr():
        batch = np.stack([digit for _, digit in pairs]).reshape((len(pairs), *input_shape))
        probabilities = np.asarray(model.predict(batch, verbose=0))
    return [
        Prediction(image, int(row.argmax()), float(row.max()), [float(p) for p in row])
        for (image, _), row in zip(pairs, probabilities)
    ]


def _require_keras_archive(model_file: Path, shown: str) -> None:
    """A .keras file is a zip archive holding config.json; anything else is named before Keras tries it."""
    with _open_regular_file(str(model_file), shown, "a model file", max_bytes=sys.maxsize) as file:
        try:
            with zipfile.ZipFile(file) as archive:
                names = set(archive.namelist())
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            reason = _reason(error)
            raise BadInputError(f"{shown}: not a Keras model file (not a .keras zip archive: {reason})") from None
    if "config.json" not in names:
        raise BadInputError(f"{shown}: not a Keras model file (a zip archive without config.json)")


def _digit_input_shape(model: object, shown: str) -> tuple[int, ...]:
    """The shape (less the batch) in which `model` takes one 28x28 digit; refuses a model for other inputs or that
    does not give one probability per digit."""
    import keras

    if not isinstance(model, keras.Model):
        raise BadInputError(f"{shown}: holds a {type(model).__name__}, not a Keras model")
    try:
        inputs, outputs = list(model.inputs), list(model.outputs)
    except Exception:  # a Sequential model saved before it was built knows neither
        raise BadInputError(f"{shown}: the model declares no input shape, so 28x28x1 digits may not fit it") from None
    if len(inputs) != 1:
        raise BadInputError(f"{shown}: expects {len(inputs)} inputs {[tuple(i.shape) for i in inputs]}, "
                            "not one 28x28x1 digit")
    shape = tuple(inputs[0].shape)
    if shape[1:] not in DIGIT_INPUTS:
        raise BadInputError(f"{shown}: expects input {shape}, not 28x28x1 digits")
    if len(outputs) != 1 or tuple(outputs[0].shape)[1:] != (NUM_CLASSES,):
        given = tuple(outputs[0].shape) if len(outputs) == 1 else [tuple(o.shape) for o in outputs]
        raise BadInputError(f"{shown}: outputs {given}, not one probability for each of the 10 digits")
    return shape[1:]


@contextmanager
def _quiet_native_stderr():
    """Sends what native code writes to file descriptor 2 to /dev/null for the block; Python errors still surface."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def format_prediction(prediction: Prediction, *, top: int = 1) -> str:
    ranked = np.argsort(prediction.probabilities)[::-1][:top]
    others = ", ".join(f"{digit} {prediction.probabilities[digit]:.1%}" for digit in ranked[1:])
    return f"{printable(prediction.image)}: {prediction.digit} ({prediction.probability:.1%})" + (
        f"  next: {others}" if others else ""
    )

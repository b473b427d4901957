"""`mnist-pipeline predict`: classify photos or scans of digits with a run's exported model.

MNIST digits are white strokes on black, scaled so the digit fits a 20x20 box and centred by its centre of mass in a
28x28 image; any image is brought into that form first, whichever way round its colours are.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from pipeline.run_folder import locate_run
from stages import storage
from stages.errors import BadInputError


@dataclass(frozen=True)
class Prediction:
    image: str
    digit: int
    probability: float
    probabilities: list[float]


def find_model(run_or_model: str, root: str) -> str:
    """A .keras file, a run folder or URI, or a run id under `root` → the model's location.

    Raises:
      BadInputError: nothing there holds a model.
    """
    model = run_or_model if run_or_model.endswith(".keras") else locate_run(run_or_model, root).model_file
    if storage.exists(model):
        return model
    raise BadInputError(
        f"no model at {run_or_model!r}: give a model.keras file, a run folder, or the id of a finished run in {root}"
    )


def load_digit(path: str) -> np.ndarray:
    """Reads a PNG/JPEG (any size, colour or grey, dark-on-light or light-on-dark) as a 28x28 uint8 MNIST digit.

    Raises:
      BadInputError: the file is missing, is not an image, or holds no digit.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"), dtype=np.float32)
    except FileNotFoundError:
        raise BadInputError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise BadInputError(f"{path}: not a readable image ({error})") from None
    return to_mnist(grey, where=path)


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


def predict(model_location: str, digits: dict[str, np.ndarray]) -> list[Prediction]:
    """Classifies each image (name -> 28x28 digit from `load_digit`) with the model at `model_location`.

    Raises:
      BadInputError: the file is not a Keras model this code can load (safe mode: no code from the file runs).
    """
    with _quiet_native_stderr():  # TensorFlow's C++ start-up lines: noise for a one-line answer
        import keras

        with storage.local_copy(model_location) as model_file:
            try:
                model = keras.models.load_model(model_file, safe_mode=True, compile=False)
            except Exception as error:  # Keras raises ValueError, OSError, zipfile errors... for a bad file
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise BadInputError(f"{model_location}: not a Keras model it can load ({first_line})") from None
        probabilities = model.predict(np.stack(list(digits.values())), verbose=0)
    return [
        Prediction(image, int(row.argmax()), float(row.max()), [float(p) for p in row])
        for image, row in zip(digits, probabilities)
    ]


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
    return f"{prediction.image}: {prediction.digit} ({prediction.probability:.1%})" + (
        f"  next: {others}" if others else ""
    )

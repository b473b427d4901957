"""`mnist-pipeline predict` on what cameras, scanners and drawing programs produce, and on hostile files.

Real MNIST test digits are written at test time in many forms (16-bit, transparent, palette, CMYK JPEG, rotated by
EXIF, multi-frame...): each must read as the same 28x28 digit as the plain 8-bit rendering. Hostile files
(decompression bombs, a FIFO, /dev/zero, corrupt or truncated files) are each one error line in a batch whose other
images are still classified.
"""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from peak_memory import MEASURED_CLI, read_peak
from PIL import Image

from pipeline.predict import load_digit, to_mnist
from stages.common.errors import BadInputError
from stages.dataset.idx import images_from, labels_from

REPO = Path(__file__).resolve().parent.parent
ORIENTATION = 0x0112  # the EXIF tag


@pytest.fixture(scope="module")
def mnist_test(mnist_mirror) -> tuple[np.ndarray, np.ndarray]:
    """The real MNIST test set: images (10000, 28, 28) uint8 and labels."""
    images = images_from(gzip.decompress((mnist_mirror / "t10k-images-idx3-ubyte.gz").read_bytes()), "t10k images")
    labels = labels_from(gzip.decompress((mnist_mirror / "t10k-labels-idx1-ubyte.gz").read_bytes()), "t10k labels")
    return images, labels


@pytest.fixture(scope="module")
def trained_model(mnist_test, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A small version of the classic CNN trained for one epoch on the first 2000 test digits (a few seconds on a
    CPU), saved as .keras; with the indices of later digits it classifies correctly and confidently."""
    import keras

    from stages.training.hyperparameters import Hyperparameters
    from stages.training.model import build_model

    images, labels = mnist_test
    keras.utils.set_random_seed(0)
    model = build_model(Hyperparameters(conv1_filters=8, conv2_filters=16, dense_units=64))
    model.fit(images[:2000], labels[:2000], batch_size=32, epochs=1, verbose=0)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    # as `predict` reads them: re-centred by `to_mnist`, which a briefly trained model is not indifferent to
    normalised = np.stack([to_mnist(image.astype(np.float32)) for image in images[8000:8400]])
    probabilities = model.predict(normalised, verbose=0)
    right = (probabilities.argmax(axis=1) == labels[8000:8400]) & (probabilities.max(axis=1) > 0.95)
    return path, 8000 + np.flatnonzero(right)


# ---- writing images as devices do ----------------------------------------------------------------------------------


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: Iterable[bytes]) -> bytes:
    """A PNG written by hand: Pillow cannot write 16-bit colour, and a bomb is written row by row in little memory."""
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(b"\0" + row) for row in rows) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def png16(planes: np.ndarray, colour_type: int) -> bytes:
    """(h, w, channels) uint16 → a 16-bit PNG (colour type 2: RGB, 4: grey+alpha, 6: RGBA)."""
    height, width, _ = planes.shape
    return png(width, height, 16, colour_type, (row.astype(">u2").tobytes() for row in planes))


def bomb(side: int) -> bytes:
    """A valid all-black 1-bit PNG of side x side pixels: a few KB on disk."""
    return png(side, side, 1, 0, (bytes(-(-side // 8)) for _ in range(side)))


def renderings(
    digit: np.ndarray, folder: Path, only: Iterable[str] | None = None
) -> dict[str, tuple[Path, np.ndarray, float]]:
    """The digit (white on black, uint8 28x28) written in the forms photos, scans and drawings come in (or in those
    named by `only`).

    Returns name → (file, the digit that file must read as, mean tolerance per pixel): lossless forms must match the
    plain 8-bit rendering of the same pixels; lossy ones (JPEG, palette) within a tolerance.
    """
    d = digit.astype(np.uint16)
    ink = 255 - digit  # dark ink on white paper
    out: dict[str, tuple[Path, np.ndarray, float]] = {}
    wanted = set(only) if only is not None else None

    def save(name: str, image: Image.Image, same_as: np.ndarray = digit, tolerance: float = 0.0, **options) -> None:
        if wanted is not None and name not in wanted:
            return
        path = folder / name
        image.save(path, **options)
        out[name] = (path, same_as, tolerance)

    def write(name: str, data: bytes, same_as: np.ndarray = digit) -> None:
        if wanted is not None and name not in wanted:
            return
        (folder / name).write_bytes(data)
        out[name] = (folder / name, same_as, 0.0)

    save("grey16.png", Image.fromarray(d * 257))  # I;16, full range: convert("L") would clip it all to white
    save("grey16b.tif", Image.fromarray((d * 257).astype(">u2")))
    save("grey12.png", Image.fromarray(np.round(digit * (4095 / 255)).astype(np.uint16)))  # a 12-bit sensor's range
    save("int32.tif", Image.fromarray((d.astype(np.int64) * 2**23 - 2**31).astype(np.int32)))  # 32-bit signed
    save("float.tif", Image.fromarray(digit.astype(np.float32) / 255))
    write("rgb16.png", png16(np.repeat((d * 257)[..., None], 3, axis=2), 2))
    # dark ink on a transparent background stored as black: black on black unless composited onto paper
    write("rgba16.png", png16(np.stack([np.zeros_like(d)] * 3 + [d * 257], axis=2), 6))
    save("rgba.png", Image.fromarray(np.stack([np.zeros_like(digit)] * 3 + [digit], axis=2)))
    save("la.png", Image.fromarray(np.stack([np.zeros_like(digit), digit], axis=2)))
    # a white digit drawn on a transparent canvas, and a digit cut out of an opaque white sheet
    save("white-on-clear.png", Image.fromarray(np.stack([np.full_like(digit, 255)] * 3 + [digit], axis=2)))
    save("stencil.png", Image.fromarray(np.stack([np.full_like(digit, 255)] * 3 + [ink], axis=2)))
    # a palette of 16 greys, index 0 transparent black
    levels = (digit // 16).astype(np.uint8)
    palette = Image.frombytes("P", (28, 28), levels.tobytes())
    palette.putpalette([0, 0, 0] + [255 - 17 * i for i in range(1, 16) for _ in range(3)])
    save("palette.png", palette, same_as=np.where(levels > 0, 17 * levels, 0).astype(np.uint8), transparency=0)
    save("one-bit.png", Image.fromarray(digit > 127), same_as=np.where(digit > 127, 255, 0).astype(np.uint8))
    save("cmyk.jpg", Image.fromarray(ink).convert("CMYK"), tolerance=1.5, quality=95)
    # a phone held sideways: pixels stored rotated, EXIF says how to show them
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # shown rotated 90 degrees clockwise
    sideways = Image.fromarray(ink).transpose(Image.Transpose.ROTATE_90)
    save("sideways.png", sideways, exif=exif)
    save("sideways.jpg", sideways.convert("RGB"), tolerance=1.5, exif=exif, quality=95)
    # a scanner's multi-page TIFF and an animated GIF: the first page/frame is the digit
    other = Image.fromarray(np.rot90(digit).copy())
    save("pages.tif", Image.fromarray(digit), save_all=True, append_images=[other])
    save("frames.gif", Image.fromarray(digit), save_all=True, append_images=[other])
    # a large scan: reduced before the float maths
    save("large.png", Image.fromarray(ink).resize((3000, 3000), Image.NEAREST), tolerance=4.0)
    return out


# ---- reading ------------------------------------------------------------------------------------------------------


def test_every_rendering_reads_as_the_plain_8_bit_digit(mnist_test, tmp_path):
    images, _ = mnist_test
    failures = []
    for index in (0, 1, 2):
        folder = tmp_path / str(index)
        folder.mkdir()
        for name, (path, same_as, tolerance) in renderings(images[index], folder).items():
            reference_file = folder / f"reference-{name}.png"
            Image.fromarray(same_as).save(reference_file)
            expected = load_digit(str(reference_file)).astype(int)
            try:
                difference = np.abs(load_digit(str(path)).astype(int) - expected)
            except BadInputError as error:
                failures.append(str(error))
                continue
            # lossless forms differ by rounding at most (a 12-bit range); lossy ones by `tolerance` on average
            if difference.mean() > tolerance + 0.1 or difference.max() > 2 + 40 * tolerance:
                failures.append(f"{name}: mean difference {difference.mean():.2f}, max {difference.max()}")
    assert not failures, "\n".join(failures)


def test_a_huge_or_special_file_is_one_line_at_once(tmp_path):
    """Bombs below, between and above Pillow's own limits, a FIFO, a folder, /dev/zero: refused without decoding or
    waiting. No image is good, so the CLI never imports TensorFlow: its peak memory is Python's and Pillow's alone."""
    (tmp_path / "81mp.png").write_bytes(bomb(9000))  # under Pillow's limit: it would decode 81 MB, then floats
    (tmp_path / "144mp.png").write_bytes(bomb(12000))  # Pillow only warns, and decodes
    (tmp_path / "10gp.png").write_bytes(png(100000, 100000, 1, 0, [bytes(12500)]))  # a header and one row
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "unused.keras").write_bytes(b"")  # never loaded: no image is good
    bad = {tmp_path / "81mp.png": "9000x9000 pixels", tmp_path / "144mp.png": "refused before decoding",
           tmp_path / "10gp.png": "refused before decoding", tmp_path / "pipe.png": "is a named pipe (FIFO)",
           tmp_path / "folder.png": "is a directory", Path("/dev/zero"): "is a character device"}
    start = time.monotonic()
    result, peak_rss = run_measured(["predict", str(tmp_path / "unused.keras"), *map(str, bad)], tmp_path, timeout=180)
    elapsed = time.monotonic() - start
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert len(lines) == len(bad), result.stderr
    for line, (path, message) in zip(lines, bad.items()):
        assert line.startswith(f"mnist-pipeline: error: {path}: ") and message in line, line
    assert peak_rss < 200 * 2**20, f"peak RSS {peak_rss / 2**20:.0f} MiB"
    print(f"bomb batch: peak RSS {peak_rss / 2**20:.0f} MiB, {elapsed:.1f} s")


def test_a_model_that_is_a_fifo_is_refused_at_once(mnist_test, tmp_path):
    """Refused before TensorFlow is imported; opening it would wait for a writer for ever (the timeout)."""
    os.mkfifo(tmp_path / "model.keras")
    Image.fromarray(mnist_test[0][0]).save(tmp_path / "digit.png")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "predict", str(tmp_path / "model.keras"), str(tmp_path / "digit.png")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"mnist-pipeline: error: {tmp_path / 'model.keras'}: is a named pipe (FIFO), " \
                                    "not a model file"


def test_a_batch_with_bad_files_classifies_every_good_one(mnist_test, trained_model, tmp_path):
    """One CLI run: good images in every form, each classified; each bad file one error line naming it; exit 2."""
    images, labels = mnist_test
    model, confident = trained_model
    good: list[tuple[bytes, int]] = []
    kinds = ["grey16.png", "rgb16.png", "rgba.png", "rgba16.png", "la.png", "palette.png", "white-on-clear.png",
             "cmyk.jpg", "sideways.jpg", "pages.tif", "frames.gif", "one-bit.png", "large.png"]
    for n, kind in enumerate(kinds):
        folder = tmp_path / f"digit{n}"
        folder.mkdir()
        index = int(confident[n])
        path, _, _ = renderings(images[index], folder, only=[kind])[kind]
        good.append((bytes(path), int(labels[index])))
    odd = tmp_path / os.fsdecode(b"odd-\xff\nname.png")  # not UTF-8, and a newline: still one line, printable
    Image.fromarray(images[int(confident[len(kinds)])]).save(odd)
    good.append((bytes(odd), int(labels[int(confident[len(kinds)])])))

    real = tmp_path / "real.png"
    Image.fromarray(images[0]).save(real)
    jpeg = tmp_path / "real.jpg"
    Image.fromarray(images[0]).save(jpeg, quality=95)
    (tmp_path / "81mp.png").write_bytes(bomb(9000))
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "corrupt.png").write_bytes(os.urandom(4000))
    (tmp_path / "truncated.png").write_bytes(real.read_bytes()[:120])
    (tmp_path / "truncated.jpg").write_bytes(jpeg.read_bytes()[:300])
    (tmp_path / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic" + bytes(100))
    bad = {"81mp.png": "9000x9000 pixels", "pipe.png": "named pipe", "corrupt.png": "not a readable image",
           "truncated.png": "not a readable image", "truncated.jpg": "not a readable image",
           "photo.heic": "HEIC", "missing.png": "not found"}
    files = [path for path, _ in good] + [bytes(tmp_path / name) for name in bad]
    result = subprocess.run([sys.executable, "-m", "pipeline", "predict", str(model), *files],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == len(bad), result.stderr
    for line, (name, message) in zip(errors, bad.items()):
        assert line.startswith("mnist-pipeline: error: ") and name in line and message in line, line
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(good), result.stdout
    for line, (path, label) in zip(lines, good):
        name, _, answer = line.rpartition(": ")
        assert name == os.fsdecode(path).replace("\n", "\\n").replace("\udcff", "\\xff")
        assert int(answer.split()[0]) == label, line


def test_a_model_of_another_shape_is_named(tmp_path, trained_model):
    import keras

    from pipeline.predict import find_model, predict

    digits = {"digit.png": np.zeros((28, 28), np.uint8)}
    colour = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)])
    colour.save(tmp_path / "colour.keras")
    five = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(), keras.layers.Dense(5)])
    five.save(tmp_path / "five.keras")
    (tmp_path / "corrupt.keras").write_bytes(trained_model[0].read_bytes()[:2000])
    (tmp_path / "text.keras").write_text("not a model")
    (tmp_path / "folder.keras").mkdir()
    cases = {
        "colour.keras": "colour.keras: expects input (None, 32, 32, 3), not 28x28x1 digits",
        "five.keras": "five.keras: outputs (None, 5), not one probability for each of the 10 digits",
        "corrupt.keras": "corrupt.keras: not a Keras model file (not a .keras zip archive",
        "text.keras": "text.keras: not a Keras model file",
        "folder.keras": "folder.keras: is a directory, not a model file",
    }
    for name, message in cases.items():
        with pytest.raises(BadInputError) as refused:
            predict(find_model(str(tmp_path / name), str(tmp_path)), digits)
        assert message in str(refused.value) and "\n" not in str(refused.value)
    # the model this project trains is taken as it is
    assert predict(str(trained_model[0]), digits)[0].image == "digit.png"


def run_measured(args: list[str], folder: Path, *, timeout: float) -> tuple[subprocess.CompletedProcess, int]:
    """Runs `mnist-pipeline ARGS`; returns the result and the command's peak RSS in bytes."""
    peak_file = folder / "peak-rss"
    result = subprocess.run([sys.executable, "-c", MEASURED_CLI, *args], capture_output=True, text=True, cwd=REPO,
                            timeout=timeout, env={**os.environ, "PEAK_RSS_FILE": str(peak_file)})
    return result, read_peak(peak_file)

r"""Offline data sets, seeded splits, and a batch iterator with augmentation.

Nothing here downloads anything.

* **digits** — scikit-learn's bundled 1,797 handwritten 8×8 digits (values 0..16), optionally
  upscaled by an integer factor (nearest neighbour, so zero pixels stay exactly zero).
* **cluttered digits** — one digit pasted at a random position of a larger canvas (32, 48, 64…)
  among *clutter*: square fragments cut from other digits at random positions. Each image comes with
  its **object mask**, exactly the non-zero pixels of the pasted digit, the ground truth against
  which computation-time maps are measured. Pixels combine by maximum, so clutter can overlap the
  digit (as in cluttered MNIST); the mask marks the digit whatever lies on top. The 1,797 source
  digits are split into disjoint train / validation / test pools first, so test images show
  digits (and clutter) never seen in training.
* **CIFAR-10** from the standard *binary* batches (``data_batch_1.bin`` … ``data_batch_5.bin``,
  ``test_batch.bin``; each record is 1 label byte and 3,072 pixel bytes, channel-major 3×32×32) in
  a directory the user names. The binary format needs no unpickling, and nothing here unpickles.
* **photos** — scikit-image's bundled sample images, for demos.

Every random choice uses an explicit ``numpy.random.Generator`` (or a seed turned into one here).
Images are float32 (N, C, H, W) in [0, 1]; labels int64 (N,).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _checks


@dataclass
class Split:
    """One split of a data set.

    Attributes
    ----------
    images : float32 (N, C, H, W) in [0, 1]
    labels : int64 (N,)
    object_masks : bool (N, H, W) or None — where the object is (cluttered digits)
    positions : int (N, 2) or None — top-left (row, col) of the pasted object
    """

    images: np.ndarray
    labels: np.ndarray
    object_masks: np.ndarray | None = None
    positions: np.ndarray | None = None

    def __len__(self):
        return int(self.labels.shape[0])

    def subset(self, index):
        pick = (lambda a: None if a is None else a[index])
        return Split(self.images[index], self.labels[index], pick(self.object_masks), pick(self.positions))


def _as_rng(seed_or_rng, name="seed"):
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    if isinstance(seed_or_rng, (int, np.integer)) and not isinstance(seed_or_rng, bool):
        return np.random.default_rng(int(seed_or_rng))
    raise TypeError(f"{name} must be an int seed or a numpy.random.Generator, got {seed_or_rng!r}")


def split_indices(n, fractions, rng):
    """Disjoint index sets covering ``range(n)`` in a seeded random order.

    ``fractions`` = (train, val, test) proportions summing to 1; returns three sorted int arrays.
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions.tolist()}")
    order = rng.permutation(n)
    n_val, n_test = int(round(fractions[1] * n)), int(round(fractions[2] * n))
    n_train = n - n_val - n_test
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    return tuple(np.sort(p) for p in parts)


# =============================================================================================
# Digits
# =============================================================================================


def upscale(images, factor):
    """Nearest-neighbour upscaling of (..., H, W) by an integer ``factor`` (zeros stay zeros)."""
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    return images.repeat(factor, axis=-2).repeat(factor, axis=-1)


@functools.lru_cache(maxsize=1)
def _read_sklearn_digits():
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def digit_source():
    """All 1,797 scikit-learn digits: images float32 (1797, 8, 8) in [0, 1], labels int64 (fresh copies)."""
    images, labels = _read_sklearn_digits()
    return images.copy(), labels.copy()


def load_digits(scale=1, seed=0, fractions=(0.6, 0.1, 0.3)):
    """The 8×8 digits (upscaled ``scale`` times) in seeded train / val / test splits.

    Returns
    -------
    dict "train" / "val" / "test" -> :class:`Split` with images (N, 1, 8·scale, 8·scale)
    """
    images, labels = digit_source()
    images = upscale(images, scale)[:, None]
    parts = split_indices(len(labels), fractions, _as_rng(seed))
    return {name: Split(images[i], labels[i]) for name, i in zip(("train", "val", "test"), parts)}


def default_clutter(canvas):
    """Clutter fragments per image: ``canvas // 8`` (4 at 32, 6 at 48, 8 at 64) — more at larger canvases."""
    return canvas // 8


def default_clutter_size(digit_side):
    """Fragment side: 0.3 of the digit's, the proportion of cluttered MNIST (8×8 pieces of 28×28 digits,
    Mnih et al. 2014) — 5 pixels for the 16×16 digits of ``digit_scale=2``."""
    return max(1, int(round(0.3 * digit_side)))


def make_cluttered(digits, labels, n, canvas, rng, digit_scale=2, n_clutter=None, clutter_size=None):
    """Paste ``n`` digits, drawn from ``digits``, on ``canvas``×``canvas`` images with clutter.

    Parameters
    ----------
    digits : float (M, 8, 8) source digits in [0, 1]; labels : (M,)
    n : number of images
    canvas : canvas side in pixels (≥ the upscaled digit)
    rng : numpy.random.Generator
    digit_scale : integer upscaling of the 8×8 digits (2 → 16×16)
    n_clutter : fragments per image (default :func:`default_clutter`)
    clutter_size : fragment side in pixels (default :func:`default_clutter_size`)

    Returns
    -------
    Split with images (n, 1, canvas, canvas), labels, object_masks (n, canvas, canvas) = the
    pasted digit's non-zero pixels, positions (n, 2) = its top-left corner.
    """
    rng = _checks.generator(rng)
    big = upscale(np.asarray(digits, dtype=np.float32), digit_scale)
    side = big.shape[-1]
    if canvas < side:
        raise ValueError(f"canvas must be at least the digit size {side}, got {canvas}")
    n_clutter = default_clutter(canvas) if n_clutter is None else int(n_clutter)
    clutter_size = default_clutter_size(side) if clutter_size is None else int(clutter_size)
    if not 1 <= clutter_size <= side:
        raise ValueError(f"clutter_size must be in [1, {side}], got {clutter_size}")
    m = big.shape[0]
    if m < 2 and n_clutter:
        raise ValueError("clutter needs at least two source digits")
    images = np.zeros((n, canvas, canvas), dtype=np.float32)
    masks = np.zeros((n, canvas, canvas), dtype=bool)
    positions = np.zeros((n, 2), dtype=np.int64)
    chosen = rng.integers(0, m, size=n)
    for i, d in enumerate(chosen):
        for _ in range(n_clutter):
            other = (d + rng.integers(1, m)) % m  # any source digit but this one
            fy, fx = rng.integers(0, side - clutter_size + 1, size=2)
            fragment = big[other, fy:fy + clutter_size, fx:fx + clutter_size]
            cy, cx = rng.integers(0, canvas - clutter_size + 1, size=2)
            window = images[i, cy:cy + clutter_size, cx:cx + clutter_size]
            np.maximum(window, fragment, out=window)
        y, x = rng.integers(0, canvas - side + 1, size=2)
        window = images[i, y:y + side, x:x + side]
        np.maximum(window, big[d], out=window)
        masks[i, y:y + side, x:x + side] = big[d] > 0
        positions[i] = y, x
    return Split(images[:, None], np.asarray(labels)[chosen].astype(np.int64), masks, positions)


def load_cluttered_digits(canvas=48, n_train=5000, n_val=500, n_test=1000, seed=0, digit_scale=2,
                          n_clutter=None, clutter_size=None, fractions=(0.6, 0.1, 0.3)):
    """Cluttered digits in train / val / test splits whose source digits are disjoint.

    The source digits are split by ``fractions`` first; each split's images (and their clutter)
    are drawn only from its own pool. Same ``seed``, same data.

    Returns
    -------
    dict "train" / "val" / "test" -> :class:`Split` (with object masks and positions)
    """
    rng = _as_rng(seed)
    digits, labels = digit_source()
    pools = split_indices(len(labels), fractions, rng)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    out = {}
    for (name, count), pool in zip(sizes.items(), pools):
        out[name] = make_cluttered(digits[pool], labels[pool], int(count), canvas, rng, digit_scale, n_clutter,
                                   clutter_size)
    return out


# =============================================================================================
# CIFAR-10, binary version
# =============================================================================================

CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch.bin"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_INSTRUCTIONS = (
    "Download the *binary version* 'cifar-10-binary.tar.gz' from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "extract it (tar xzf cifar-10-binary.tar.gz) and pass the folder 'cifar-10-batches-bin' that it creates."
)


class DatasetFormatError(ValueError):
    """A data file exists but is not in the expected format."""


def read_cifar10_batch(path):
    """Read one CIFAR-10 binary batch file.

    Each record is ``<1 byte label 0..9><3072 bytes: 1024 red, 1024 green, 1024 blue, row-major>``.

    Returns
    -------
    images : uint8 (N, 3, 32, 32); labels : int64 (N,)

    Raises
    ------
    FileNotFoundError if ``path`` does not exist; :class:`DatasetFormatError` (a ValueError) if
    its size is not a positive multiple of 3,073 bytes (truncated, or not a CIFAR-10 binary batch)
    or a label is above 9 (e.g. the CIFAR-100 binary format, whose records are 3,074 bytes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch {str(path)!r} does not exist. {CIFAR_INSTRUCTIONS}")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD_BYTES:
        whole, rest = divmod(raw.size, CIFAR_RECORD_BYTES)
        raise DatasetFormatError(
            f"{str(path)!r} has {raw.size} bytes, which is not a positive multiple of the CIFAR-10 record size "
            f"{CIFAR_RECORD_BYTES} (1 label byte + 3072 pixel bytes): {whole} whole records and {rest} bytes left "
            f"over. The file is truncated or not a CIFAR-10 binary batch (the Python/pickle version is not "
            f"accepted). {CIFAR_INSTRUCTIONS}")
    records = raw.reshape(-1, CIFAR_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DatasetFormatError(
            f"{str(path)!r}: record {bad} has label {labels[bad]}, but CIFAR-10 labels are 0..9 "
            f"(is this a CIFAR-100 file?). {CIFAR_INSTRUCTIONS}")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(directory, n_val=5000, seed=0):
    """CIFAR-10 from the binary batches in ``directory``: train / val / test :class:`Split` s.

    The validation split is ``n_val`` images taken (seeded) from the 50,000 training images.
    """
    if directory is None:
        raise FileNotFoundError(f"no CIFAR-10 directory given. {CIFAR_INSTRUCTIONS}")
    directory = Path(os.path.expanduser(str(directory)))
    if not directory.is_dir():
        raise FileNotFoundError(f"CIFAR-10 directory {str(directory)!r} does not exist. {CIFAR_INSTRUCTIONS}")
    missing = [f for f in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE) if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 directory {str(directory)!r} lacks {missing}. {CIFAR_INSTRUCTIONS}")
    train = [read_cifar10_batch(directory / f) for f in CIFAR_TRAIN_FILES]
    images = np.concatenate([t[0] for t in train])
    labels = np.concatenate([t[1] for t in train])
    test_images, test_labels = read_cifar10_batch(directory / CIFAR_TEST_FILE)
    if not 0 <= n_val < len(labels):
        raise ValueError(f"n_val must be in [0, {len(labels) - 1}], got {n_val}")
    order = _as_rng(seed).permutation(len(labels))
    val, tr = np.sort(order[:n_val]), np.sort(order[n_val:])
    to_float = (lambda a: a.astype(np.float32) / 255.0)
    return {"train": Split(to_float(images[tr]), labels[tr]), "val": Split(to_float(images[val]), labels[val]),
            "test": Split(to_float(test_images), test_labels)}


def write_cifar10_batch(path, images, labels):
    """Write images uint8 (N, 3, 32, 32) and labels (N,) in the CIFAR-10 binary format (for fixtures)."""
    images, labels = np.asarray(images, dtype=np.uint8), np.asarray(labels)
    if images.shape[1:] != (3, 32, 32) or labels.shape != (images.shape[0],):
        raise ValueError(f"images must be (N, 3, 32, 32) with labels (N,), got {images.shape} and {labels.shape}")
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1)
    records.tofile(path)


# =============================================================================================
# Photos
# =============================================================================================

PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "cat")


def load_photo(name="astronaut", size=None, grayscale=False):
    """A scikit-image sample photo as float32 (C, H, W) in [0, 1]; ``size`` = (H, W) to resize to."""
    _checks.choice(name, "name", set(PHOTOS))
    from skimage import color, data, transform

    image = getattr(data, name)()
    image = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if grayscale and image.ndim == 3:
        image = color.rgb2gray(image).astype(np.float32)
    if size is not None:
        image = transform.resize(image, tuple(size) + image.shape[2:], anti_aliasing=True).astype(np.float32)
    return image[None] if image.ndim == 2 else np.ascontiguousarray(image.transpose(2, 0, 1))


# =============================================================================================
# Batches and augmentation
# =============================================================================================


@dataclass(frozen=True)
class Augment:
    """Random crop with zero padding (``crop_padding`` pixels each side) and horizontal flip.

    Flip is off by default: it is wrong for digits (a flipped 2 is not a 2) and right for CIFAR.
    """

    crop_padding: int = 0
    flip: bool = False

    def __call__(self, images, rng):
        out = images
        if self.crop_padding:
            out = random_crop(out, self.crop_padding, rng)
        if self.flip:
            out = random_flip(out, rng)
        return out


def random_crop(images, padding, rng):
    """Pad (N, C, H, W) by ``padding`` zeros and cut an H×W window at a random offset per image."""
    n, _, h, w = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    offsets = rng.integers(0, 2 * padding + 1, size=(n, 2))
    return np.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(offsets)])


def random_flip(images, rng):
    """Mirror each image left-right with probability 1/2."""
    flip = rng.random(images.shape[0]) < 0.5
    out = images.copy()
    out[flip] = out[flip, :, :, ::-1]
    return out


def iterate_batches(images, labels, batch_size, rng=None, augment=None, drop_last=False):
    """Yield ``(x, y)`` mini-batches.

    Parameters
    ----------
    images : (N, C, H, W); labels : (N,)
    batch_size : int
    rng : numpy.random.Generator or None — shuffles the order (and drives ``augment``) when given
    augment : callable(x, rng) -> x, e.g. :class:`Augment`; needs ``rng``
    drop_last : skip a final incomplete batch
    """
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if augment is not None and rng is None:
        raise ValueError("augment needs rng (a numpy.random.Generator)")
    n = len(labels)
    order = np.arange(n) if rng is None else _checks.generator(rng).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        x = images[index]
        if augment is not None:
            x = augment(x, rng)
        yield np.ascontiguousarray(x), labels[index]


# =============================================================================================
# By name (the command line)
# =============================================================================================

DATASETS = ("digits", "cluttered-digits", "cifar10")


def load_dataset(name, seed=0, scale=1, canvas=48, n_train=5000, n_val=None, n_test=1000, digit_scale=2,
                 n_clutter=None, cifar_dir=None):
    """Load a data set by name: ``"digits"`` (``scale``), ``"cluttered-digits"`` (``canvas``,
    ``n_train``/``n_val``/``n_test``, ``digit_scale``, ``n_clutter``) or ``"cifar10"`` (``cifar_dir``,
    ``n_val``). ``n_val=None`` means 500 for cluttered digits and 5000 for CIFAR-10.

    Returns
    -------
    splits : dict "train" / "val" / "test" -> Split
    info : dict with ``num_classes``, ``in_channels``, ``image_hw`` and ``flip`` (whether a
        horizontal flip is a valid augmentation)
    """
    _checks.choice(name, "data", set(DATASETS))
    if name == "digits":
        splits = load_digits(scale, seed)
    elif name == "cluttered-digits":
        splits = load_cluttered_digits(canvas, n_train, 500 if n_val is None else n_val, n_test, seed, digit_scale,
                                       n_clutter)
    else:
        splits = load_cifar10(cifar_dir, 5000 if n_val is None else n_val, seed=seed)
    shape = splits["train"].images.shape
    info = {"num_classes": 10, "in_channels": int(shape[1]), "image_hw": [int(shape[2]), int(shape[3])],
            "flip": name == "cifar10"}
    return splits, info


# =============================================================================================
# One image from a file or a photo name (``ponder map``)
# =============================================================================================


def load_image(spec, channels, size=None):
    """The image named by ``spec`` as float32 (1, channels, H, W) in [0, 1].

    Parameters
    ----------
    spec : str or Path — an image file (PNG, JPEG, TIFF, ...) or a name in :data:`PHOTOS`
    channels : 1 or 3 — colour is converted to gray and gray repeated to match
    size : None, int or (H, W) — resize (anti-aliased) to this size

    Raises
    ------
    FileNotFoundError
        ``spec`` is neither a file nor a photo name.
    ValueError
        the file is a folder or not an image, or has a channel count that cannot be converted.
    """
    from skimage import color, io, transform

    path = Path(os.path.expanduser(str(spec)))
    if path.is_dir():
        raise ValueError(f"image {str(spec)!r} is a folder; expected an image file (PNG, JPEG, TIFF, ...)")
    if path.is_file():
        try:
            image = np.asarray(io.imread(path))
        except Exception:  # imageio/PIL raise many types, with advice about plugins; all mean "not an image"
            head = path.read_bytes()[:512]
            kind = "a text file" if head and b"\0" not in head and head.isascii() else "in no image format it knows"
            raise ValueError(f"image {str(spec)!r} is not an image file scikit-image can read: it is {kind}; "
                             "expected PNG, JPEG, TIFF, ...") from None
        if image.ndim not in (2, 3) or image.size == 0:
            raise ValueError(f"image {str(spec)!r} has shape {image.shape}; expected a 2-D gray or colour image")
        image = image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
    elif str(spec) in PHOTOS:
        image = load_photo(str(spec))
    else:
        raise FileNotFoundError(f"image {str(spec)!r} is neither an existing file nor a photo name ({', '.join(PHOTOS)})")
    if channels == 1 and image.shape[0] == 3:
        image = color.rgb2gray(image.transpose(1, 2, 0))[None]
    elif channels == 3 and image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    elif image.shape[0] != channels:
        raise ValueError(f"the model takes {channels} channels, image {str(spec)!r} has {image.shape[0]}")
    if size is not None:
        h, w = _checks.positive_pair(size, "size")
        image = transform.resize(image, (image.shape[0], h, w), anti_aliasing=True)
    return np.ascontiguousarray(image[None], dtype=np.float32)

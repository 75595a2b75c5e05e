"""The disjoint example sets a Simfluence experiment draws: pre-training, pool and test.

Simfluence fine-tunes many runs from one start on random halves of a pool and watches a
test set, so the three sets must never share an example, and the draw must be fixed by the
seed for an interrupted run to resume on the same data. The images come from the bundled
MNIST digits (no download) or the Fashion-MNIST idx files; the texts are (domain, text)
pairs from `datafluence.datasets.domain_texts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datafluence.datasets.mnist import ImageSet, load_fashion_mnist, load_mnist_subset

IMAGE_DATASETS = ("mnist-subset", "fashion-mnist")


def _rng(seed: int) -> np.random.Generator:
    """The split's own random stream, apart from the one curricula and inits use."""
    return np.random.default_rng([seed, 7])


def split_images(
    dataset: str,
    pretrain_size: int,
    pool_size: int,
    test_size: int,
    seed: int,
    data_dir: str | Path | None = None,
) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(pre-training, pool, test): disjoint random draws of `dataset`, fixed by the seed.

    The bundled subset is split three ways; Fashion-MNIST draws pre-training and pool from
    its training split and the test set from its test split.
    """
    if dataset not in IMAGE_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {IMAGE_DATASETS}")
    rng = _rng(seed)
    a, b = pretrain_size, pretrain_size + pool_size
    if dataset == "mnist-subset":
        digits = load_mnist_subset()
        need = pretrain_size + pool_size + test_size
        if need > len(digits):
            raise ValueError(
                f"pretrain_size + pool_size + test_size = {need} but the bundled subset holds "
                f"{len(digits)} digits; make them smaller or use --dataset fashion-mnist"
            )
        perm = rng.permutation(len(digits))
        return digits.subset(perm[:a]), digits.subset(perm[a:b]), digits.subset(perm[b:need])
    train = load_fashion_mnist("train", data_dir=data_dir)
    test = load_fashion_mnist("test", data_dir=data_dir)
    if pretrain_size + pool_size > len(train) or test_size > len(test):
        raise ValueError(
            f"Fashion-MNIST has {len(train)} training and {len(test)} test images; ask for fewer"
        )
    perm = rng.permutation(len(train))
    test_perm = rng.permutation(len(test))[:test_size]
    return train.subset(perm[:a]), train.subset(perm[a:b]), test.subset(test_perm)


def split_texts(
    items: Sequence[tuple[str, str]], pool_size: int, test_size: int, seed: int
) -> tuple[list[tuple[str, str]], list[str]]:
    """(chosen (domain, text) pairs, their ids): pool first, then test, fixed by the seed.

    An id is `text-<position in items>`, so scores point back into the source list.
    """
    need = pool_size + test_size
    if need > len(items):
        raise ValueError(
            f"pool_size + test_size = {need} but only {len(items)} texts are available; ask for "
            "fewer or pass a longer --texts file"
        )
    perm = _rng(seed).permutation(len(items))
    chosen = [items[i] for i in perm[:need]]
    return chosen, [f"text-{int(i)}" for i in perm[:need]]

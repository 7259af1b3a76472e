"""Datasets: the input pipelines (pipeline.py, `make_dataset`) and their preparation
(preparation.py). Importing it imports TensorFlow (tf.data); nothing else in zoo does."""

from zoo.data.pipeline import (DATASETS, SMALL_DATASETS, DatasetCorruptError,
                               DatasetNotFoundError, DatasetSpec, data_dir_of, dataset_info,
                               make_dataset, padding_to)
from zoo.data.preparation import DEBIAN_FASHION_MNIST, IMAGENET_STEPS, prepare

__all__ = ["DATASETS", "DEBIAN_FASHION_MNIST", "DatasetCorruptError", "DatasetNotFoundError",
           "DatasetSpec", "IMAGENET_STEPS", "SMALL_DATASETS", "data_dir_of", "dataset_info",
           "make_dataset", "padding_to", "prepare"]

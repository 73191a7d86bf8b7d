"""Datasets (image folders through an index, tar shards, Fashion-MNIST), transforms and samplers
for training and evaluation, and the one image reader (`read_image`) every tool uses."""
from .datasets import ClassSubset, Unlabelled, build_datasets
from .fashion_mnist import FashionMNIST, read_idx
from .folder import ImageFolder, IndexedImages
from .images import IMAGE_SUFFIXES, READ_ERRORS, read_image, to_mode
from .sampler import GlobalBatchSampler, SeededTransform, ShardSampler
from .shards import ShardDataset, write_shards
from .transforms import build_transform

__all__ = ['ClassSubset', 'FashionMNIST', 'GlobalBatchSampler', 'IMAGE_SUFFIXES', 'ImageFolder',
           'IndexedImages', 'READ_ERRORS', 'SeededTransform', 'ShardDataset', 'ShardSampler',
           'Unlabelled', 'build_datasets', 'build_transform', 'read_idx', 'read_image', 'to_mode',
           'write_shards']

"""Datasets, transforms and samplers for training and evaluation, and the one image reader
(`read_image`) every tool uses."""
from .datasets import ClassSubset, build_datasets
from .fashion_mnist import FashionMNIST, read_idx
from .folder import ImageFolder
from .images import IMAGE_SUFFIXES, READ_ERRORS, read_image, to_mode
from .sampler import GlobalBatchSampler, SeededTransform, ShardSampler
from .transforms import build_transform

__all__ = ['ClassSubset', 'FashionMNIST', 'GlobalBatchSampler', 'IMAGE_SUFFIXES', 'ImageFolder',
           'READ_ERRORS', 'SeededTransform', 'ShardSampler', 'build_datasets', 'build_transform',
           'read_idx', 'read_image', 'to_mode']

"""Datasets, transforms and samplers for training and evaluation."""
from .datasets import ClassSubset, build_datasets
from .fashion_mnist import FashionMNIST, read_idx
from .folder import ImageFolder, to_mode
from .sampler import GlobalBatchSampler, SeededTransform, ShardSampler
from .transforms import build_transform

__all__ = ['ClassSubset', 'FashionMNIST', 'GlobalBatchSampler', 'ImageFolder', 'SeededTransform',
           'ShardSampler', 'build_datasets', 'build_transform', 'read_idx', 'to_mode']

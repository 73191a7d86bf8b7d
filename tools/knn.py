#!/usr/bin/env python
"""k-NN top-1 of a checkpoint's frozen features: `python tools/knn.py
checkpoint=outputs/dino_fashion_mnist/<run>/checkpoints/last.pth` (weights=random: the same
network untrained; weights=pixels: raw pixels). Same as the `conformer-knn` console script."""
from conformer.engine.knn import knn_cli

if __name__ == '__main__':
    knn_cli()

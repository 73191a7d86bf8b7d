#!/usr/bin/env python
"""Evaluate a checkpoint: `python tools/eval.py data=fashion_mnist model=conformer_nano
checkpoint=outputs/.../checkpoints/best.pth`. Same as the `conformer-eval` console script."""
from conformer.engine.cli import eval_cli

if __name__ == '__main__':
    eval_cli()

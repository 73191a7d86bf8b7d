#!/usr/bin/env python
"""Evaluate a checkpoint: `python tools/eval.py checkpoint=runs/quickstart/checkpoints/best.pth
data=fashion_mnist aug=none` (the model comes from the checkpoint). Same as the `conformer-eval`
console script."""
from conformer.engine.cli import eval_cli

if __name__ == '__main__':
    eval_cli()

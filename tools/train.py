#!/usr/bin/env python
"""Train or fine-tune a Conformer: `python tools/train.py experiment=quickstart`.

Same as the `conformer-train` console script; see configs/ and README for the options.
"""
from conformer.engine.cli import train_cli

if __name__ == '__main__':
    train_cli()

#!/usr/bin/env python
"""Write an image folder as tar shards in timm's wds/ layout, or build a dataset's index once.

Same as the `conformer-shards` console script; see conformer/cli/shards.py."""
import sys

from conformer.cli.shards import main

if __name__ == '__main__':
    sys.exit(main())

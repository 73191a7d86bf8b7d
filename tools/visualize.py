#!/usr/bin/env python
"""The paper's Figure 2 view (both branches' activations) and both heads' CAMs as a PNG.

Same as the `conformer-visualize` console script; see conformer/cli/visualize.py."""
import sys

from conformer.cli.visualize import main

if __name__ == '__main__':
    sys.exit(main())

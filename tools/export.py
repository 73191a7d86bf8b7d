#!/usr/bin/env python
"""Export a Conformer to ONNX and torch.export with dynamic batch and image size.

Same as the `conformer-export` console script; see conformer/cli/export.py."""
import sys

from conformer.cli.export import main

if __name__ == '__main__':
    sys.exit(main())

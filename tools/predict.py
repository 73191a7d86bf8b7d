#!/usr/bin/env python
"""Top-5 labels with probabilities for image files and folders.

Same as the `conformer-predict` console script; see conformer/cli/predict.py."""
import sys

from conformer.cli.predict import main

if __name__ == '__main__':
    sys.exit(main())

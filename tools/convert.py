#!/usr/bin/env python
"""Convert Conformer weights into a Hugging Face Hub folder (safetensors + config.json + card).

Same as the `conformer-convert` console script; see conformer/cli/convert.py."""
import sys

from conformer.cli.convert import main

if __name__ == '__main__':
    sys.exit(main())

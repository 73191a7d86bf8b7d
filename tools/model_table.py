#!/usr/bin/env python
"""Print the parameter / MAC table of every Conformer variant.

Same as the `conformer-model-table` console script; see conformer/cli/model_table.py."""
import sys

from conformer.cli.model_table import main

if __name__ == '__main__':
    sys.exit(main())

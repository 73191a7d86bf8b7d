#!/usr/bin/env python
"""Benchmark a Conformer: eager reference vs deploy modes (images/s, latency, memory, GFLOP/s,
training step).

Same as the `conformer-benchmark` console script; see conformer/cli/benchmark.py."""
import sys

from conformer.cli.benchmark import main

if __name__ == '__main__':
    sys.exit(main())

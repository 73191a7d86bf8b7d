"""Benchmark a Conformer: eager reference vs deploy modes (images/s, latency, memory, GFLOP/s, training step).

Same as the `conformer-benchmark` console script; see conformer/benchmark.py."""
import sys

from conformer.benchmark import main

if __name__ == '__main__':
    sys.exit(main())

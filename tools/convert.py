#!/usr/bin/env python
"""Convert Conformer weights into a Hugging Face Hub folder (safetensors + config.json + card).

Same as the `conformer-convert` console script; see `conformer.weights.convert`.
"""
from conformer.weights.convert import main

if __name__ == '__main__':
    main()

"""The command-line tools, one module each, installed as console scripts.

==========================  =====================================  ==========================
console script              module                                 what it does
==========================  =====================================  ==========================
``conformer-predict``       :mod:`conformer.cli.predict`           top-k labels for images
``conformer-visualize``     :mod:`conformer.cli.visualize`         Figure 2 maps and CAMs
``conformer-export``        :mod:`conformer.cli.export`            ONNX and torch.export files
``conformer-convert``       :mod:`conformer.cli.convert`           weights to a Hub folder
``conformer-benchmark``     :mod:`conformer.cli.benchmark`         speed of the deploy modes
``conformer-model-table``   :mod:`conformer.cli.model_table`       parameters and MACs
``conformer-train``/``-eval``  :mod:`conformer.engine.cli`         Hydra training and eval
==========================  =====================================  ==========================

Each module holds only its argument parsing and printing; the work is done by the library
(:mod:`conformer.predict`, :mod:`conformer.viz`, :mod:`conformer.export`, ...).
:mod:`conformer.cli.common` holds what several tools share: the model and weights options,
finding images, and output paths checked before any work. ``tools/*.py`` run the same mains
from a source checkout.
"""

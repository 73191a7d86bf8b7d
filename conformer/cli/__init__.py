"""The command-line tools, one module each, installed as console scripts.

- ``conformer-predict`` (:mod:`conformer.cli.predict`): top-k labels for image files and folders.
- ``conformer-visualize`` (:mod:`conformer.cli.visualize`): the paper's Figure 2 maps and both
  heads' class activation maps for one image.
- ``conformer-export`` (:mod:`conformer.cli.export`): ONNX and torch.export files.
- ``conformer-convert`` (:mod:`conformer.cli.convert`): weights to a Hugging Face Hub folder.
- ``conformer-benchmark`` (:mod:`conformer.cli.benchmark`): the deploy modes against the eager
  reference.
- ``conformer-model-table`` (:mod:`conformer.cli.model_table`): parameters and MACs.
- ``conformer-train`` and ``conformer-eval``: Hydra applications, in :mod:`conformer.engine.cli`.

Each module parses arguments and prints; the work is done by the library
(:mod:`conformer.predict`, :mod:`conformer.viz`, :mod:`conformer.export`,
:mod:`conformer.weights.convert`, :mod:`conformer.benchmark`, :mod:`conformer.models.profile`).
:mod:`conformer.cli.common` holds what several tools share: the model and weights options,
finding images, and output paths checked before any work; :mod:`conformer.cli.outputs` makes
sure an output is never one of the tool's inputs.
``tools/*.py`` run the same mains from a source checkout.
"""

"""Post-training static int8 for CPU inference: :func:`quantize_int8` (what
``optimize_for_inference(model, dtype=torch.int8, calibration=...)`` runs) and
:func:`check_quantized`, the check of a quantized model against its float model.

Built on PyTorch's own path, PT2E quantization with torchao's ``X86InductorQuantizer``,
compiled by inductor with freezing: oneDNN then runs the int8 convolutions and linears with
their ReLU and residual add fused (AVX-512 VNNI, or AMX where the CPU has it), and inductor
fuses the quantize/dequantize steps into the float ops around them. Install it with
``pip install conformer-zoo[int8]``.

What becomes int8, and what stays in float:

- int8, weights per output channel (symmetric), activations per tensor (asymmetric, from
  the calibration images' min/max): every convolution of the CNN branch (BatchNorm folded
  first, ReLU and the residual add fused), the FCU-down/up 1x1 convolutions and every
  transformer linear (qkv, proj, fc1, fc2);
- float (bf16 on a CPU with native bf16, else fp32): attention's two matmuls and softmax,
  LayerNorm, GELU, pooling and upsampling, and the layers in ``keep_float`` (default: the stem
  convolution, which sees raw pixels through 3 channels, and the two classifier heads, whose
  logits decide top-1; together about 1% of the FLOPs).

The model is exported once at the calibration images' height, width and channels, with a
dynamic batch dimension: any batch size runs (each new size compiles once); another image
size is refused with a message, since the token grid is part of the exported graph.
"""
import copy
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from conformer import runtime
from conformer.deploy import CONV_BNS, InferenceModel, fold_batchnorm

__all__ = ['DEFAULT_KEEP_FLOAT', 'MIN_CALIBRATION_IMAGES', 'QuantizedModel', 'Calibration',
           'calibration_images', 'check_quantized', 'format_check', 'load_int8', 'quantize_int8']

DEFAULT_KEEP_FLOAT = ('conv1', 'conv_cls_head', 'trans_cls_head')
MIN_CALIBRATION_IMAGES = 32  # fewer gives activation ranges that miss the tails of real data
LOW_SQNR_DB = 20.0  # a layer output below this signal-to-quantisation-noise ratio is flagged
SOURCE_FNS = {torch.ops.aten.linear.default: torch.nn.functional.linear,
              torch.ops.aten.conv2d.default: torch.nn.functional.conv2d}
INSTALL = "int8 deploy needs torchao: pip install 'conformer-zoo[int8]'"
SAVED_SETTINGS = 'conformer_int8.json'  # QuantizedModel.save's record inside the .pt2 file


@dataclass
class Calibration:
    """Calibration images in batches, as the model takes them, with their labels if known.

    Attributes:
        batches: float tensors (B, C, H, W), every one the same C, H, W.
        labels: one int64 tensor per batch, or None when the source had no labels.
    """
    batches: List[torch.Tensor]
    labels: Optional[List[torch.Tensor]] = None

    @property
    def num_images(self) -> int:
        return sum(len(b) for b in self.batches)


def _eval_transform(model: nn.Module):
    """The model's own eval preprocessing (resize, centre crop, normalise), as predict uses."""
    from timm.data import create_transform, resolve_data_config
    return create_transform(**resolve_data_config({}, model=model))


def _split(item: Any) -> Tuple[Any, Optional[Any]]:
    """(images, labels) of a dataset item or loader batch: a tensor, or (images, labels, ...)."""
    if isinstance(item, (tuple, list)):
        return item[0], (item[1] if len(item) > 1 else None)
    if isinstance(item, dict) and 'image' in item:
        return item['image'], item.get('label')
    return item, None


def calibration_images(calibration: Union[str, Path, torch.Tensor, Dataset, Iterable],
                       model: nn.Module, max_images: int = 512, batch_size: int = 32,
                       min_images: int = MIN_CALIBRATION_IMAGES) -> Calibration:
    """Read calibration images, preprocessed as for evaluation, and check them.

    Args:
        calibration: a folder of ``<class>/<image>`` files, a tensor of images
            (N, C, H, W), a dataset yielding an image or (image, label), or an iterable of
            batches such as a DataLoader (a tensor or (images, labels) each). PIL images (a
            folder's, a dataset's) go through the model's eval transform from its
            ``pretrained_cfg``; tensors must be preprocessed so already.
        model: the model to calibrate; its ``in_chans`` is checked.
        max_images: read at most this many images.
        batch_size: images per batch for a folder, tensor or dataset.
        min_images: refuse fewer.

    Raises:
        ValueError: no images, too few, not images (B, C, H, W), another channel count than the
            model's, or images of different sizes.
    """
    if calibration is None:
        raise ValueError('int8 needs calibration images: pass calibration= a folder of '
                         '<class>/<image> files, a dataset or a DataLoader of a few hundred '
                         'images preprocessed as for evaluation')
    if isinstance(calibration, (str, Path)):
        from conformer.data import ImageFolder
        calibration = ImageFolder(str(calibration), in_chans=getattr(model, 'in_chans', 3))
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration[i:i + batch_size]
                       for i in range(0, len(calibration), batch_size)] if calibration.dim() \
            else [calibration]
    elif isinstance(calibration, Dataset) and hasattr(calibration, '__len__'):
        # an evenly spread subset, so a class-sorted folder still calibrates on every class
        step = max(1, len(calibration) // max_images)
        subset = torch.utils.data.Subset(calibration, range(0, len(calibration), step))
        calibration = DataLoader(_Preprocessed(subset, model), batch_size=batch_size)
    batches, labels, count = [], [], 0
    for item in calibration:
        images, target = _split(item)
        if not isinstance(images, torch.Tensor):
            raise ValueError(f'calibration items must be image tensors (B, C, H, W) or '
                             f'(images, labels), got {type(images).__name__}; preprocess '
                             f'them with the eval transform (ToTensor, Normalize) first')
        if images.dim() == 3:
            images = images[None]
            target = None if target is None else torch.as_tensor(target).reshape(1)
        _check_batch(images, model, batches[0] if batches else None)
        images = images[:max_images - count].float()
        batches.append(images)
        labels.append(None if target is None else torch.as_tensor(target)[:len(images)])
        count += len(images)
        if count >= max_images:
            break
    if count < min_images:
        raise ValueError(f'calibration has {count} images; give at least {min_images} (a few '
                         f'hundred is best) so the activation ranges cover real inputs')
    has_labels = all(t is not None for t in labels)
    return Calibration(batches, [t.long() for t in labels] if has_labels else None)


class _Preprocessed(Dataset):
    """A dataset's items with PIL images run through the model's eval transform."""

    def __init__(self, dataset: Dataset, model: nn.Module):
        self.dataset, self.model, self.transform = dataset, model, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        image, label = _split(item)
        if isinstance(image, Image.Image):
            self.transform = self.transform or _eval_transform(self.model)
            image = self.transform(image)
            return image if label is None else (image, label)
        return item


def _check_batch(images: torch.Tensor, model: nn.Module,
                 first: Optional[torch.Tensor]) -> None:
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f'calibration images must be float tensors (B, C, H, W), got '
                         f'{images.dtype} shaped {tuple(images.shape)}; preprocess them with '
                         f'the eval transform (ToTensor, Normalize) first')
    in_chans = getattr(model, 'in_chans', images.shape[1])
    if images.shape[1] != in_chans:
        raise ValueError(f'calibration images have {images.shape[1]} channels, the model takes '
                         f'{in_chans}; convert them as for evaluation (RGB for 3 channels, '
                         f'L for 1)')
    if first is not None and images.shape[1:] != first.shape[1:]:
        raise ValueError(f'calibration images of different sizes: {tuple(first.shape[1:])} '
                         f'and {tuple(images.shape[1:])}; resize and crop all of them as for '
                         f'evaluation, at the size the model will serve')


class _FoldedBatchNorm(nn.Identity):
    """Stands for a BatchNorm folded into its convolution. The blocks run a BatchNorm that
    reports ``training`` as a module after a plain ``conv(x)`` (see
    :func:`conformer.layers.blocks.conv_bn_relu`), so the exported graph holds
    conv2d(bias) [+ residual] [-> ReLU], the pattern the quantizer fuses, instead of the
    conv -> per-channel affine the eval path computes."""

    @property
    def training(self) -> bool:
        return True

    @training.setter
    def training(self, mode: bool) -> None:
        pass


def _exportable(model: nn.Module) -> nn.Module:
    """An eval copy with BatchNorm folded and every op on its PyTorch reference."""
    prepared = copy.deepcopy(model).eval()
    fold_batchnorm(prepared)
    for module in prepared.modules():
        for _, bn_name in CONV_BNS:
            if type(getattr(module, bn_name, None)) is nn.Identity:
                setattr(module, bn_name, _FoldedBatchNorm())
    if hasattr(prepared, 'set_kernel_backend'):
        prepared.set_kernel_backend('torch')
    for p in prepared.parameters():
        p.requires_grad_(False)
    return prepared


def _x86_quantization():
    """torchao's x86 quantizer module; importing it registers the inductor passes that lower
    the graph's int8 steps to oneDNN kernels (without them a compiled graph runs its float
    reference)."""
    # torchao registers an Enum with torch's pytree on import, which torch logs as deprecated:
    # a line about torchao's internals that users of this function cannot act on
    pytree_log = logging.getLogger('torch.utils._pytree')
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as e:
        raise ImportError(INSTALL) from e
    finally:
        pytree_log.setLevel(level)
    return x86_inductor_quantizer


def _quantizer(keep_float: Sequence[str]):
    xiq = _x86_quantization()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    for name in keep_float:
        quantizer.set_module_name_qconfig(name, None)
    return quantizer


def _check_model(model: nn.Module, keep_float: Sequence[str]) -> None:
    if isinstance(model, (InferenceModel, torch.fx.GraphModule)):
        raise ValueError('model is already deployed or quantized; pass the original float '
                         'model to quantize')
    if any(type(m).__module__.startswith(('torch.ao.quantization', 'torchao.quantization'))
           for m in model.modules()):
        raise ValueError('model already holds quantization modules (observers or quantized '
                         'layers); pass the original float model')
    if torch.is_inference_mode_enabled():
        raise RuntimeError('int8 quantization exports the model, which inference mode forbids; '
                           'call it outside torch.inference_mode()')
    names = dict(model.named_modules())
    unknown = [n for n in keep_float if n not in names]
    if unknown:
        raise ValueError(f'keep_float names no module of the model: {unknown}; use names from '
                         f'model.named_modules(), e.g. conv_trans_12.trans_block.mlp.fc2')


def quantize_int8(model: nn.Module, calibration: Any,
                  keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT,
                  float_dtype: Optional[torch.dtype] = None, max_images: int = 512,
                  compile: bool = True, compile_mode: Optional[str] = None) -> 'QuantizedModel':
    """Post-training static int8 copy of ``model``, calibrated on ``calibration``.

    The original model is not modified. See the module docstring for what becomes int8.

    Args:
        model: a float Conformer (or any model torch.export can trace).
        calibration: see :func:`calibration_images`; a few hundred images preprocessed as
            for evaluation, at the size the model will serve.
        keep_float: module names left in float (``model.named_modules()`` names).
        float_dtype: the dtype of the ops left in float; default bf16 on a CPU with native
            bf16, else fp32.
        max_images: calibrate on at most this many images.
        compile: run through ``torch.compile`` with freezing, which lowers the graph to int8
            oneDNN kernels. Without it the graph runs its reference ops (fp32 arithmetic on
            dequantized values, the same numbers, slower than fp32): for checks only.
        compile_mode: passed to torch.compile.

    Raises:
        ImportError: torchao is not installed.
        ValueError: bad calibration data (see :func:`calibration_images`), an already
            quantized or deployed model, or ``keep_float`` naming no module.
    """
    _check_model(model, keep_float)
    data = calibration_images(calibration, model, max_images=max_images)
    quantizer = _quantizer(keep_float)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    device = next(model.parameters()).device
    if float_dtype is None:
        float_dtype = torch.bfloat16 if runtime.native_bf16(device) else torch.float32
    exported = _export(_exportable(model), data.batches[0].to(device))
    with warnings.catch_warnings():
        # the stem convolution is float by default, so the max pool after it stays float too,
        # which the quantizer reports as a warning
        warnings.filterwarnings('ignore', message='The input of maxpool2d is not quantized')
        prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for images in data.batches:
            prepared(images.to(device))
    converted = convert_pt2e(prepared)
    return QuantizedModel(converted, model, tuple(data.batches[0].shape[1:]), float_dtype,
                          tuple(keep_float), data.num_images, compile, compile_mode)


def _export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of the model's forward with a dynamic batch dimension."""
    batch = torch.export.Dim('batch', min=1, max=4096)
    # a batch of 1 would specialise the batch dimension; trace with at least 2 images
    example = example[:2] if len(example) > 1 else example.expand(2, -1, -1, -1)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def _export(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """The model's forward as an ATen graph with a dynamic batch dimension."""
    graph = _export_program(model, example).module()
    for node in list(graph.graph.nodes):
        # the ops' references cast weights to the input's dtype: a no-op in fp32 that would
        # hide the weight from the quantizer's conv pattern
        if node.target == torch.ops.aten.to.dtype and \
                node.args[0].meta['val'].dtype == node.args[1]:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
        # the quantizer finds lone linears and convolutions (those it matches in no fused
        # pattern) by the source function export records; the functional calls inside the
        # kernels' references leave none
        elif node.target in SOURCE_FNS and not node.meta.get('source_fn_stack'):
            node.meta['source_fn_stack'] = [(node.name, SOURCE_FNS[node.target])]
    graph.recompile()
    return graph


class QuantizedModel(InferenceModel):
    """An int8 model from :func:`quantize_int8`: ``model(x)`` gives fp32 logits, through
    ``torch.compile`` with inductor freezing, the float ops under ``float_dtype`` autocast.

    Only ``forward`` exists (the exported graph is the classifier's forward); every other
    attribute (``num_classes``, ``pretrained_cfg``...) comes from the float model.

    Args:
        graph: the converted PT2E graph.
        float_model: the model it was quantized from (kept for its attributes and checks),
            or for a model :func:`load_int8` read, the attributes the file keeps.
        input_shape: (C, H, W) the graph was exported and calibrated at.
        float_dtype: dtype of the ops left in float.
        keep_float: module names left in float.
        calibration_images: how many images calibrated it.
        compile: run through ``torch.compile`` with freezing (see :func:`quantize_int8`).
        compile_mode: passed to torch.compile.
    """

    def __init__(self, graph: torch.fx.GraphModule, float_model: nn.Module,
                 input_shape: Tuple[int, int, int], float_dtype: torch.dtype,
                 keep_float: Tuple[str, ...], calibration_images: int, compile: bool = True,
                 compile_mode: Optional[str] = None):
        super().__init__(graph, dtype=torch.float32, compile=compile, compile_mode=compile_mode)
        self.autocast = compile and float_dtype == torch.bfloat16
        self.float_dtype = float_dtype
        self.input_shape = input_shape
        self.keep_float = keep_float
        self.calibration_images = calibration_images
        self.__dict__['float_model'] = float_model  # not a submodule: no double state_dict
        self.training = False

    def train(self, mode: bool = True) -> 'QuantizedModel':
        """Only ``train(False)`` is allowed (an exported graph has no train mode to switch).

        Args:
            mode: must be False.
        """
        if mode:
            raise RuntimeError('an int8 model is for inference only; train the float model')
        self.training = False
        return self

    def __getattr__(self, name: str) -> Any:
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name in ('model', 'float_model'):
                raise
            return getattr(self.__dict__['float_model'], name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f'expected images (B, C, H, W), got '
                             f'{getattr(x, "shape", type(x).__name__)}')
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f'this int8 model was calibrated and exported for images '
                f'{self.input_shape} (C, H, W), got {tuple(x.shape[1:])}; resize and crop '
                f'inputs to {self.input_shape[1]}x{self.input_shape[2]}, or quantize again '
                f'with calibration images of the size you serve (any batch size works)')
        if x.requires_grad:
            raise RuntimeError('an int8 model is for inference only and has no gradients; '
                               'use the float model under autograd')
        with warnings.catch_warnings():
            # inductor's int8 lowering copies zero points with torch.tensor(tensor), which
            # warns on every compile; nothing a caller can change
            warnings.filterwarnings('ignore', message='To copy construct from a tensor')
            return self._call('forward', x)

    def _float_only(self, name: str):
        raise NotImplementedError(f'an int8 model exports forward only; for {name} deploy the '
                                  f'float model (optimize_for_inference with dtype=torch.bfloat16)')

    def forward_features(self, x):
        """Not exported: see ``forward``."""
        self._float_only('forward_features')

    def forward_head(self, features, pre_logits=False):
        """Not exported: see ``forward``."""
        self._float_only('forward_head')

    def forward_intermediates(self, x, **kwargs):
        """Not exported: see ``forward``."""
        self._float_only('forward_intermediates')

    def _to_deployed(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.float().contiguous(memory_format=torch.channels_last)
        return x

    def save(self, path: Union[str, Path]) -> Path:
        """Write the int8 graph to ``path`` (a ``torch.export`` program, ``.pt2``), with what
        :func:`load_int8` needs to serve it: the input shape, the float settings, the class
        count and the preprocessing config. A server then loads it without the calibration
        images or the float model. The file appears whole or not at all.

        Args:
            path: the file to write; its folder must exist.

        Returns:
            The path written.
        """
        path = Path(path)
        program = _export_program(self.model, torch.zeros(2, *self.input_shape))
        settings = {'input_shape': list(self.input_shape),
                    'float_dtype': str(self.float_dtype).removeprefix('torch.'),
                    'keep_float': list(self.keep_float),
                    'calibration_images': self.calibration_images,
                    'num_classes': getattr(self, 'num_classes', None),
                    'pretrained_cfg': _json_safe(getattr(self, 'pretrained_cfg', None) or {})}
        tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}')
        try:
            torch.export.save(program, tmp, extra_files={SAVED_SETTINGS: json.dumps(settings)})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def _json_safe(config: dict) -> dict:
    """The entries of a timm ``pretrained_cfg`` that JSON holds as they are (tuples become
    lists)."""
    safe = {}
    for key, value in config.items():
        try:
            safe[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            continue
    return safe


class _SavedAttributes:
    """What a loaded int8 model answers for its float model's attributes."""

    def __init__(self, settings: dict):
        self.num_classes = settings.get('num_classes')
        self.pretrained_cfg = settings.get('pretrained_cfg') or {}

    def __getattr__(self, name: str):
        raise AttributeError(f'an int8 model loaded from a file has no {name!r}; it keeps '
                             f'num_classes and pretrained_cfg of the model it was quantized from')


def load_int8(path: Union[str, Path], compile: bool = True,
              compile_mode: Optional[str] = None) -> QuantizedModel:
    """An int8 model that :meth:`QuantizedModel.save` wrote, ready to serve as
    :func:`quantize_int8` returned it (any batch size, the saved image size).

    Needs torchao (``pip install conformer-zoo[int8]``), whose inductor passes turn the
    int8 steps into oneDNN kernels when the model compiles.

    Args:
        path: the ``.pt2`` file.
        compile: run through ``torch.compile`` with freezing (see :func:`quantize_int8`).
        compile_mode: passed to torch.compile.

    Raises:
        ImportError: torchao is not installed.
        FileNotFoundError: no such file.
        ValueError: the file is not an int8 model that ``QuantizedModel.save`` wrote, or is
            damaged.
    """
    _x86_quantization()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no such file; write one with '
                                f'QuantizedModel.save (conformer-export --int8)')
    extra = {SAVED_SETTINGS: ''}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as e:  # a damaged zip or graph: torch raises several kinds
        raise ValueError(f'{path} cannot be read as a torch.export program ({e}); the file is '
                         f'damaged or was not written by QuantizedModel.save; write it again') \
            from e
    if not extra[SAVED_SETTINGS]:
        raise ValueError(f'{path} is a torch.export program but not an int8 model written by '
                         f'QuantizedModel.save (it lacks {SAVED_SETTINGS}); float programs '
                         f'from conformer-export load with torch.export.load')
    try:
        settings = json.loads(extra[SAVED_SETTINGS])
        input_shape = tuple(int(n) for n in settings['input_shape'])
        float_dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[
            settings['float_dtype']]
        keep_float = tuple(str(name) for name in settings['keep_float'])
        calibration = int(settings['calibration_images'])
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f'{path}: its record of the int8 settings ({SAVED_SETTINGS}) is '
                         f'damaged ({e!r}); write the file again with QuantizedModel.save') from e
    return QuantizedModel(program.module(), _SavedAttributes(settings), input_shape,
                          float_dtype, keep_float, calibration, compile, compile_mode)


# ----------------------------------------------------------------------------- the check


@dataclass
class LayerError:
    """One quantized layer's output against the float model's, on the same images.

    Attributes:
        name: the layer (its weight's name without ``.weight``).
        module: the module that calls it, the name ``keep_float`` takes.
        sqnr_db: 10 log10(|float|^2 / |float - int8|^2), accumulated through the layers before.
    """
    name: str
    module: str
    sqnr_db: float


@dataclass
class QuantCheck:
    """A quantized model against its float model.

    Attributes:
        images: how many images were compared.
        top1_agreement: share of images with the same top-1 class.
        float_accuracy, int8_accuracy: top-1 accuracy, when labels were given.
        layers: per-layer error of every quantized layer, in graph order.
        low: modules holding a layer whose SQNR is below ``LOW_SQNR_DB``.
    """
    images: int
    top1_agreement: float
    float_accuracy: Optional[float] = None
    int8_accuracy: Optional[float] = None
    layers: List[LayerError] = field(default_factory=list)
    low: List[str] = field(default_factory=list)


def check_quantized(float_model: nn.Module, quantized: QuantizedModel, data: Any,
                    max_images: int = 10_000, layer_images: int = 32) -> QuantCheck:
    """Top-1 agreement and accuracy of ``quantized`` against ``float_model`` on ``data``, and
    the error of every quantized layer's output (on the first ``layer_images`` images).

    Args:
        float_model: the float model (run as is, fp32 eager).
        quantized: its :func:`quantize_int8` result.
        data: images as :func:`calibration_images` takes them; labels give accuracies. Use
            images not used for calibration.
        max_images: compare at most this many images.
        layer_images: images for the per-layer comparison.
    """
    data = calibration_images(data, float_model, max_images=max_images, min_images=1)
    float_model = float_model.eval()
    agree, correct_f, correct_q, n = 0, 0, 0, 0
    with torch.no_grad():
        for i, images in enumerate(data.batches):
            pf, pq = float_model(images).argmax(-1), quantized(images).argmax(-1)
            agree += (pf == pq).sum().item()
            if data.labels is not None:
                correct_f += (pf == data.labels[i]).sum().item()
                correct_q += (pq == data.labels[i]).sum().item()
            n += len(images)
    check = QuantCheck(images=n, top1_agreement=agree / n)
    if data.labels is not None:
        check.float_accuracy, check.int8_accuracy = correct_f / n, correct_q / n
    sample = torch.cat(data.batches)[:layer_images]
    check.layers = layer_errors(float_model, quantized, sample)
    check.low = list(dict.fromkeys(e.module for e in check.layers if e.sqnr_db < LOW_SQNR_DB))
    return check


def _layer_outputs(graph: torch.fx.GraphModule, x: torch.Tensor) -> List[torch.Tensor]:
    """Outputs of the conv2d/linear nodes of an exported graph, in graph order."""
    targets = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
    wanted = {n for n in graph.graph.nodes if n.op == 'call_function' and n.target in targets}
    outputs = []

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node in wanted:
                outputs.append(result.detach().float())
            return result

    with torch.no_grad():
        Recorder(graph).run(x)
    return outputs


def _layer_names(graph: torch.fx.GraphModule) -> List[Tuple[str, str]]:
    """(layer, module) of each conv2d/linear node of a float exported graph, in graph order:
    the layer is its weight's name (``...mlp.fc1``), the module the innermost module calling
    it (``...mlp``), which is what ``keep_float`` takes."""
    targets = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
    names = []
    for node in graph.graph.nodes:
        if node.op == 'call_function' and node.target in targets:
            weight = node.args[1]
            layer = str(weight.target).removesuffix('.weight') if weight.op == 'get_attr' \
                else weight.name
            stack = node.meta.get('nn_module_stack') or {'': ('', None)}
            module = list(stack.values())[-1][0].removeprefix('L__self__.')
            names.append((layer, module))
    return names


def layer_errors(float_model: nn.Module, quantized: QuantizedModel,
                 x: torch.Tensor) -> List[LayerError]:
    """SQNR of each quantized layer's output against the float graph's, in graph order (the
    uncompiled graphs, so the figures do not depend on the compiler's fusions). The
    quantized graph keeps the float graph's convolutions and linears in the same order, with
    (de)quantize steps around them."""
    reference = _export(_exportable(float_model), x)
    expected, got = _layer_outputs(reference, x), _layer_outputs(quantized.model, x)
    names = _layer_names(reference)
    if not len(expected) == len(got) == len(names):
        raise RuntimeError(f'the float and int8 graphs differ in layer count ({len(expected)} '
                           f'and {len(got)}); per-layer comparison is not possible')
    errors = []
    for (layer, module), want, out in zip(names, expected, got):
        if _in(module, quantized.keep_float):
            continue
        noise = (want - out).pow(2).sum().item()
        signal = want.pow(2).sum().item()
        sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
        errors.append(LayerError(layer, module, sqnr))
    return errors


def _in(name: str, modules: Sequence[str]) -> bool:
    return any(name == m or name.startswith(m + '.') for m in modules)


def format_check(check: QuantCheck, worst: int = 5) -> str:
    """The check as lines a user reads: agreement, accuracies, the worst layers and the fix."""
    lines = [f'int8 vs float on {check.images} images: top-1 agreement '
             f'{100 * check.top1_agreement:.2f}%']
    if check.float_accuracy is not None:
        lines.append(f'top-1 accuracy: float {100 * check.float_accuracy:.2f}%, int8 '
                     f'{100 * check.int8_accuracy:.2f}% '
                     f'({100 * (check.int8_accuracy - check.float_accuracy):+.2f} points)')
    ranked = sorted(check.layers, key=lambda e: e.sqnr_db)[:worst]
    if ranked:
        lines.append('lowest layer SQNR (dB, accumulated): ' + ', '.join(
            f'{e.name} {e.sqnr_db:.1f}' for e in ranked))
    if check.low:
        lines.append(f'layers below {LOW_SQNR_DB:.0f} dB in {", ".join(check.low)}; to keep '
                     f'them in float (bf16), quantize again with keep_float='
                     f'DEFAULT_KEEP_FLOAT + {tuple(check.low)!r}')
    return '\n'.join(lines)


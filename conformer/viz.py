"""What each branch sees: the paper's Figure 2 view and class activation maps for both heads.

- Branch activation maps: after a chosen ConvTransBlock, the CNN branch's map (channel mean
  of the block output) and the transformer branch's patch tokens (channel mean, laid back
  on the token grid), side by side, as in the paper's Figure 2.
- Class activation maps (CAM): the CNN head is global average pooling plus a linear layer,
  so its CAM is the classic ``sum_c w[k, c] * map[c]`` over the final CNN map. The
  transformer head reads the class token; applying it to every normalised patch token gives
  the matching per-token score map for class ``k``.

``conformer-visualize`` (:mod:`conformer.cli.visualize`) draws both for one image.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

import conformer  # noqa: F401  (registers the variants with timm)

__all__ = ['branch_activation_maps', 'class_activation_maps', 'conv_trans_blocks', 'plot_maps']


def conv_trans_blocks(model: nn.Module) -> Dict[int, nn.Module]:
    """The ConvTransBlocks by their paper number (conv_trans_2 .. conv_trans_{depth}).

    Args:
        model: a Conformer.
    """
    return {int(name.rsplit('_', 1)[1]): m for name, m in model.named_children()
            if name.startswith('conv_trans_')}


def branch_activation_maps(model: nn.Module, x: torch.Tensor,
                           block: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """``{'cnn': (B, h, w), 'transformer': (B, gh, gw)}``: channel-mean activations of the two
    branches at the output of a ConvTransBlock. Puts the model in eval mode.

    Args:
        model: a Conformer.
        x: images (B, C, H, W), preprocessed for the model.
        block: the ConvTransBlock's paper number (2..depth); None means the last.

    Raises:
        ValueError: ``block`` is out of range.
    """
    blocks = conv_trans_blocks(model)
    block = max(blocks) if block is None else block
    if block not in blocks:
        raise ValueError(f'block must be one of {min(blocks)}..{max(blocks)} '
                         f'(the ConvTransBlocks conv_trans_i), got {block}')
    captured = {}

    def hook(module, args, output):
        (cnn, tokens), grid = output, args[2]
        captured['cnn'] = cnn.mean(1)
        patches = tokens[:, 1:]
        captured['transformer'] = patches.mean(-1).reshape(-1, *grid)

    handle = blocks[block].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.eval().forward_features(x)
    finally:
        handle.remove()
    return captured


def class_activation_maps(model: nn.Module, x: torch.Tensor,
                          class_index: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """CAMs of both heads: ``{'cnn': (B, h, w), 'transformer': (B, gh, gw), 'class_index': (B,)}``.

    Puts the model in eval mode.

    Args:
        model: a Conformer with classifier heads.
        x: images (B, C, H, W), preprocessed for the model.
        class_index: the class to map; None means each image's top-1 class of the summed
            logits.

    Raises:
        ValueError: the model has no heads, or ``class_index`` is out of range.
    """
    if not model.num_classes:
        raise ValueError('class activation maps need the classifier heads; the model has '
                         'num_classes=0')
    grid = []
    handle = model.trans_patch_conv.register_forward_hook(
        lambda module, args, out: grid.append(tuple(out.shape[2:])))
    try:
        with torch.no_grad():
            cnn_map, tokens = model.eval().forward_features(x)
    finally:
        handle.remove()
    with torch.no_grad():
        logits = model.forward_head((cnn_map, tokens))
        if class_index is None:
            classes = logits.argmax(-1)
        elif 0 <= class_index < model.num_classes:
            classes = torch.full((x.shape[0],), class_index, dtype=torch.long)
        else:
            raise ValueError(f'class_index must be in 0..{model.num_classes - 1}, '
                             f'got {class_index}')
        conv_head, trans_head = model.get_classifier()
        cnn_cam = torch.einsum('bc,bchw->bhw', conv_head.weight[classes], cnn_map)
        token_scores = trans_head(tokens[:, 1:])  # (B, N, classes)
        index = classes[:, None, None].expand(-1, tokens.shape[1] - 1, 1)
        token_scores = token_scores.gather(-1, index)
    return dict(cnn=cnn_cam, transformer=token_scores.reshape(-1, *grid[0]),
                class_index=classes)


def _normalise(m: torch.Tensor, size) -> torch.Tensor:
    """Upsample one (h, w) map to ``size`` and scale it to [0, 1] for display."""
    m = F.interpolate(m[None, None].float(), size=size, mode='bilinear', align_corners=False)[0, 0]
    return (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)


def plot_maps(image, activations: Dict[str, torch.Tensor], cams: Dict[str, torch.Tensor],
              class_name: str, block: int, path: str) -> None:
    """Save a one-row figure: the image (RGB, or 2-D grayscale), both branches' activations,
    both heads' CAMs, each map of the first image of the batch.

    Args:
        image: the input image, a PIL image or uint8 array (0-255).
        activations: `branch_activation_maps` output.
        cams: `class_activation_maps` output.
        class_name: the mapped class, for the titles.
        block: the block number of ``activations``, for the titles.
        path: the image file to write (format from its suffix).
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import numpy as np

    picture = np.asarray(image, dtype=np.float32) / 255
    size = picture.shape[:2]
    panels = [('input', None),
              (f'CNN branch, block {block}', activations['cnn'][0]),
              (f'transformer branch, block {block}', activations['transformer'][0]),
              (f'CNN head CAM: {class_name}', cams['cnn'][0]),
              (f'transformer head CAM: {class_name}', cams['transformer'][0])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3))
    for ax, (title, m) in zip(axes, panels):
        ax.imshow(picture, cmap='gray' if picture.ndim == 2 else None)
        if m is not None:
            ax.imshow(_normalise(m, size).numpy(), cmap='jet', alpha=0.5)
        ax.set_title(title, fontsize=8)
        ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

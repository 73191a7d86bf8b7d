"""Conformer: Local Features Coupling Global Representations for Visual Recognition.

Peng et al., ICCV 2021 (arXiv:2105.03889). A ResNet-style CNN branch and a ViT branch run
side by side; at every block feature-coupling units (FCUs) exchange information between
them. Both branches end in a classifier: evaluation sums the two heads' logits, training
averages their cross-entropies.

Parameter names match the paper's code (`conv1`, `conv_1`, `trans_1`, `conv_trans_{i}`, ...),
so its checkpoints load with `load_state_dict` as they are.
"""
import logging
import re
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.fx
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import (
    adapt_input_conv,
    build_model_with_cfg,
    clean_state_dict,
    generate_default_cfgs,
    list_models,
    list_pretrained,
    parse_model_name,
    register_model,
    split_model_name_tag,
)
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from conformer.kernels import BACKENDS
from conformer.layers import ConvBlock, FCUDown, FCUUp, KernelLayer, TransformerBlock

__all__ = ['Conformer', 'ConvTransBlock', 'check_model_name']

STEM_STRIDES = {'imagenet': 4, 'pooled': 2, 'small': 1}


def check_input(x: torch.Tensor, in_chans: int, min_size: int) -> None:
    """Reject inputs the network cannot take, before they fail deep inside a conv.

    Args:
        x: the input batch.
        in_chans: image channels the model takes.
        min_size: smallest height and width accepted (the patch size), in pixels.

    Raises:
        ValueError: ``x`` is not 4-D, has another channel count or is smaller than ``min_size``.
    """
    if x.dim() != 4:
        raise ValueError(f'expected a batch of images shaped (B, {in_chans}, H, W), got shape '
                         f'{x.shape}; add a batch dimension with x.unsqueeze(0)')
    if x.shape[1] != in_chans:
        raise ValueError(f'the model takes {in_chans}-channel images, got shape {x.shape}; '
                         f'create the model with in_chans={x.shape[1]} for such images')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(f'input {x.shape[2]}x{x.shape[3]} is smaller than the patch size '
                         f'{min_size}; resize images to at least {min_size} px on each side')


torch.fx.wrap('check_input')  # a leaf for FX: its branches look at concrete shapes


class ConvTransBlock(nn.Module):
    """One coupled stage step: CNN bottleneck, FCU down, transformer block, FCU up, fusion.

    Args:
        in_chs: input channels of the CNN bottleneck.
        out_chs: output channels of the CNN branch (the FCUs couple at out_chs // 4).
        res_conv: give the bottleneck a 1x1 conv + BN shortcut (needed when shape changes).
        stride: stride of the bottleneck's 3x3 conv (2 opens a stage).
        embed_dim: token width of the transformer branch.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        qkv_bias: give the qkv projection a bias.
        proj_drop: dropout after the attention and MLP projections.
        attn_drop: dropout on the attention weights.
        drop_path: stochastic depth rate of the transformer block.
        last_fusion: this is the network's last block: its fusion bottleneck has stride 2, so
            the CNN branch ends at stride 32.
    """

    def __init__(self, in_chs: int, out_chs: int, res_conv: bool, stride: int, embed_dim: int,
                 num_heads: int, mlp_ratio: float, qkv_bias: bool, proj_drop: float,
                 attn_drop: float, drop_path: float, last_fusion: bool = False):
        super().__init__()
        self.cnn_block = ConvBlock(in_chs, out_chs, stride=stride, res_conv=res_conv)
        if last_fusion:
            # the network's last block halves the CNN map so the branch ends at stride 32
            self.fusion_block = ConvBlock(out_chs, out_chs, stride=2, res_conv=True)
        else:
            self.fusion_block = ConvBlock(out_chs, out_chs)
        self.squeeze_block = FCUDown(out_chs // 4, embed_dim)
        self.expand_block = FCUUp(embed_dim, out_chs // 4)
        self.trans_block = TransformerBlock(
            embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_path)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor,
                grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        x, x2 = self.cnn_block(x)
        x_st = self.squeeze_block(x2, x_t, grid)
        x_t = self.trans_block(x_st + x_t)  # the class token is added twice, as in the paper
        h = self.expand_block(x_t, grid, self.fusion_block.reduce(x))  # adds the tokens in
        x, _ = self.fusion_block.expand(h, x)
        return x, x_t


class Conformer(nn.Module):
    """Conformer with a CNN branch (`conv_*`) and a transformer branch (`trans_*`).

    `model(x)` returns the sum of both heads' logits (the paper's evaluation); after
    `model.set_dual_head_training()`, train-mode calls return `(conv_logits, trans_logits)`.
    `forward_features` returns `(cnn_map, tokens)`: the final CNN map (B, C, H/32, W/32) and
    the normalised token sequence (B, 1 + N, D) with the class token first.

    Args:
        patch_size: token stride in input pixels.
        in_chans: input image channels.
        num_classes: classes of both heads (0: `model(x)` returns the pooled features).
        base_channel, channel_ratio: CNN widths are base_channel * channel_ratio * (1, 2, 4).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the transformer branch.
        stem_type: 'imagenet' (7x7/2 conv + max pool), 'pooled' or 'small' (for tiny images).
        drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate: regularisation.
        device, dtype: where and in which dtype to create the parameters (timm's
            `create_model(..., device=, dtype=)`; 'meta' builds without memory).
    """

    def __init__(
            self,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            base_channel: int = 64,
            channel_ratio: int = 4,
            embed_dim: int = 384,
            depth: int = 12,
            num_heads: int = 6,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            stem_type: str = 'imagenet',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        _check_args(patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                    base_channel=base_channel, channel_ratio=channel_ratio, embed_dim=embed_dim,
                    depth=depth, num_heads=num_heads, stem_type=stem_type,
                    drop_rate=drop_rate, proj_drop_rate=proj_drop_rate,
                    attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        stem_stride = STEM_STRIDES[stem_type]
        dw_stride = patch_size // stem_stride  # token stride relative to the stem output
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grad_checkpointing = False
        self.dual_head_training = False
        chs = [base_channel * channel_ratio * m for m in (1, 2, 4)]
        self.conv_features = chs[-1]
        self.num_features = self.head_hidden_size = chs[-1] + embed_dim

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # linear over the transformer blocks only (plain floats, so meta-device builds work)
        dpr = [drop_path_rate * i / (depth - 1) for i in range(depth)]

        # stem: 7x7/2 conv + 3x3/2 max pool for ImageNet-sized inputs; for tiny ones a 3x3/1
        # conv, alone ('small') or before a 2x2 max pool ('pooled': a quarter of the pixels
        # for every CNN stage, so a wider branch costs less than a narrow one at full size)
        if stem_type == 'imagenet':
            self.conv1 = nn.Conv2d(in_chans, base_channel, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_chans, base_channel, 3, stride=1, padding=1, bias=False)
            self.maxpool = (nn.MaxPool2d(2, ceil_mode=True) if stem_type == 'pooled'
                            else nn.Identity())
        self.bn1 = nn.BatchNorm2d(base_channel)
        self.act1 = nn.ReLU(inplace=True)

        block_kw = dict(embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate)
        self.conv_1 = ConvBlock(base_channel, chs[0], res_conv=True)
        self.trans_patch_conv = nn.Conv2d(base_channel, embed_dim, dw_stride, stride=dw_stride)
        self.trans_1 = TransformerBlock(
            embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[0])

        # blocks 2..depth in three stages; each later stage opens with a stride-2 block
        per_stage = depth // 3
        self.feature_info = []
        in_chs = chs[0]
        for i in range(2, depth + 1):
            stage = (i - 1) // per_stage
            first_of_stage = stage > 0 and (i - 1) % per_stage == 0
            self.add_module(f'conv_trans_{i}', ConvTransBlock(
                in_chs, chs[stage], res_conv=first_of_stage, stride=2 if first_of_stage else 1,
                drop_path=dpr[i - 1], last_fusion=i == depth, **block_kw))
            in_chs = chs[stage]
            if i % per_stage == 0 or i == depth - 1:
                # the paper's detection taps: the end of each stage, and the block before the
                # final stride-2 fusion (strides 4, 8, 16, 32 with the ImageNet stem)
                reduction = stem_stride * 2 ** (stage + (i == depth))
                self.feature_info.append(
                    dict(num_chs=chs[stage], reduction=reduction, module=f'conv_trans_{i}'))
        self.feature_info.sort(key=lambda f: f['reduction'])

        self.trans_norm = nn.LayerNorm(embed_dim)
        self.pooling = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.conv_cls_head = nn.Linear(chs[-1], num_classes) if num_classes else nn.Identity()
        self.trans_cls_head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()

        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_weights)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise lr decay: block i is conv_1/trans_1 (i=1) or
        conv_trans_i.

        Args:
            coarse: timm's coarse/fine switch; both give the same groups here.
        """
        return dict(
            stem=r'^cls_token|^conv1|^bn1|^trans_patch_conv',
            blocks=[(r'^(?:conv|trans)_(1)\.', None), (r'^conv_trans_(\d+)', None),
                    (r'^trans_norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each coupled block in the backward instead of storing its activations.

        Args:
            enable: turn gradient checkpointing on (True) or off.
        """
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_dual_head_training(self, enable: bool = True) -> None:
        """While enabled, `model(x)` in train mode returns `(conv_logits, trans_logits)`.

        The paper trains with the mean of the two heads' cross-entropies; evaluation (eval
        mode) always returns the summed logits. Same switch as timm's DeiT distilled models.

        Args:
            enable: return both heads' logits in train mode (True) or their sum.
        """
        self.dual_head_training = enable

    @torch.jit.ignore
    def set_kernel_backend(self, backend: Optional[str]) -> None:
        """Pin this model's kernels to one backend.

        Args:
            backend: 'auto' | 'triton' | 'torch' | 'onednn'; None follows
                `conformer.kernels.set_backend` / `use_backend`.

        Raises:
            ValueError: ``backend`` is none of these.
        """
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f'unknown kernel backend {backend!r}; choose one of {BACKENDS} '
                             'or None')
        for module in self.modules():
            if isinstance(module, KernelLayer):
                module.kernel_backend = backend

    @torch.jit.ignore
    def get_classifier(self) -> Tuple[nn.Module, nn.Module]:
        return self.conv_cls_head, self.trans_cls_head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace both heads, freshly initialised, on the model's device and dtype.

        Args:
            num_classes: classes of the new heads; 0 makes the model return pooled features.
            global_pool: None or 'avg' (the only pooling the heads use).
        """
        if global_pool not in (None, 'avg'):
            raise ValueError(f"global_pool={global_pool!r} is not supported: the CNN head uses "
                             f"average pooling and the transformer head the class token; "
                             f"pass global_pool=None or 'avg'")
        _check_args(num_classes=num_classes)
        self.num_classes = num_classes
        # new heads live where the model does (its device, dtype and train/eval mode)
        like = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)
        self.conv_cls_head = (nn.Linear(self.conv_features, num_classes, **like)
                              if num_classes else nn.Identity())
        self.trans_cls_head = (nn.Linear(self.embed_dim, num_classes, **like)
                               if num_classes else nn.Identity())
        for head in self.get_classifier():
            head.apply(_init_weights)
            head.train(self.training)

    def _stem(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
        """Shared entry of both branches: the CNN stem and the first coupled step."""
        check_input(x, self.in_chans, self.patch_size)
        x_base = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x_t = self.trans_patch_conv(x_base)
        grid = (x_t.shape[2], x_t.shape[3])
        x_t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1),
                         x_t.flatten(2).transpose(1, 2)], dim=1)
        x, _ = self.conv_1(x_base)
        return x, self.trans_1(x_t), grid

    # The block loops below walk named_children() so the paper's parameter names stay
    # top-level; blocks are recognised by attribute because TorchScript's isinstance
    # refinement accepts only the first of several ConvTransBlock module types.
    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Both branches' features: `(cnn_map, tokens)` (see the class docstring).

        Args:
            x: images (B, in_chans, H, W), H and W at least the patch size.
        """
        x, x_t, grid = self._stem(x)
        for _, block in self.named_children():
            if hasattr(block, 'squeeze_block'):  # a ConvTransBlock
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x, x_t = checkpoint(block, x, x_t, grid, use_reentrant=False)
                else:
                    x, x_t = block(x, x_t, grid)
        return x, self.trans_norm(x_t)

    def forward_head(self, features: Tuple[torch.Tensor, torch.Tensor],
                     pre_logits: bool = False) -> torch.Tensor:
        """Summed logits, or with pre_logits the two pooled vectors concatenated (CNN first).

        Args:
            features: `(cnn_map, tokens)` from `forward_features`.
            pre_logits: return the pooled vectors instead of the logits.
        """
        x, x_t = features
        pooled = self.head_drop(torch.cat([self.pooling(x).flatten(1), x_t[:, 0]], dim=1))
        if pre_logits or self.num_classes == 0:
            return pooled
        conv_logits, trans_logits = self._heads(pooled)
        return conv_logits + trans_logits

    def _heads(self, pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return (self.conv_cls_head(pooled[:, :self.conv_features]),
                self.trans_cls_head(pooled[:, self.conv_features:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        if self.dual_head_training and self.training and not torch.jit.is_scripting():
            # (conv_logits, trans_logits) for the paper's loss; see set_dual_head_training
            return self._heads(self.forward_head(features, pre_logits=True))
        return self.forward_head(features)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[Tuple[torch.Tensor, torch.Tensor], List[torch.Tensor]]]:
        """CNN-branch maps at the `feature_info` taps (strides 4/8/16/32 by default: all four).

        Args:
            x: images (B, in_chans, H, W).
            indices: selects among the taps (int: the last n; None: all).
            norm: has no effect (the CNN branch has no final norm).
            stop_early: stop after the last tap wanted instead of running every block.
            output_fmt: 'NCHW', the only format supported.
            intermediates_only: return the maps alone.

        Returns:
            The maps, or `(forward_features output, maps)`.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; use 'NCHW'")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        take_modules = [self.feature_info[i]['module'] for i in take_indices]
        last_module = self.feature_info[max_index]['module']
        intermediates: List[torch.Tensor] = []
        x, x_t, grid = self._stem(x)
        for name, block in self.named_children():
            if hasattr(block, 'squeeze_block'):  # a ConvTransBlock
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x, x_t = checkpoint(block, x, x_t, grid, use_reentrant=False)
                else:
                    x, x_t = block(x, x_t, grid)
                if name in take_modules:
                    intermediates.append(x)
                if stop_early and name == last_module:
                    break
        if intermediates_only:
            return intermediates
        return (x, self.trans_norm(x_t)), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last tap wanted (and the heads) for a feature extractor.

        Args:
            indices: the taps kept, as for `forward_intermediates`.
            prune_norm: replace the final token norm with an identity.
            prune_head: remove both classifier heads.

        Returns:
            The tap indices taken.
        """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last = int(self.feature_info[max_index]['module'].rsplit('_', 1)[1])
        for name, block in list(self.named_children()):
            if isinstance(block, ConvTransBlock) and int(name.rsplit('_', 1)[1]) > last:
                delattr(self, name)
        if prune_norm:
            self.trans_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices


def _init_weights(m: nn.Module) -> None:
    """The paper's initialisation: truncated-normal linears, Kaiming convs, unit norms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _check_args(**kw: Any) -> None:
    """Validate constructor arguments with messages that say what to pass instead."""
    def fail(msg: str):
        raise ValueError(f'Conformer: {msg}')

    for name in ('in_chans', 'base_channel', 'channel_ratio', 'embed_dim', 'depth', 'num_heads',
                 'patch_size'):
        if name in kw and (not isinstance(kw[name], int) or kw[name] < 1):
            fail(f'{name} must be a positive integer, got {kw[name]!r}')
    if 'num_classes' in kw and (not isinstance(kw['num_classes'], int) or kw['num_classes'] < 0):
        fail(f"num_classes must be an integer >= 0 (0 returns pooled features), "
             f"got {kw['num_classes']!r}")
    for name in ('drop_rate', 'proj_drop_rate', 'attn_drop_rate', 'drop_path_rate'):
        if name in kw and not 0. <= kw[name] < 1.:
            fail(f'{name} must be in [0, 1), got {kw[name]!r}')
    if 'stem_type' in kw:
        if kw['stem_type'] not in STEM_STRIDES:
            fail(f"stem_type must be one of {sorted(STEM_STRIDES)}, got {kw['stem_type']!r}")
        granule = 4 * STEM_STRIDES[kw['stem_type']]
        if kw['patch_size'] % granule:
            fail(f"patch_size must be a multiple of {granule} with stem_type="
                 f"{kw['stem_type']!r} (the token grid halves twice against the CNN branch), "
                 f"got {kw['patch_size']}")
    if 'depth' in kw and (kw['depth'] % 3 or kw['depth'] < 6):
        fail(f"depth must be a multiple of 3 and at least 6 (three stages of equal length, "
             f"each with a detection tap), got {kw['depth']}")
    if 'embed_dim' in kw and kw['embed_dim'] % kw['num_heads']:
        fail(f"embed_dim {kw['embed_dim']} must be divisible by num_heads {kw['num_heads']}")


_logger = logging.getLogger(__name__)

# mmpretrain's TransformerEncoderLayer names for the parts of the paper's transformer Block
_MMPRETRAIN_BLOCK_KEY = re.compile(
    r'^(trans_1|conv_trans_\d+\.trans_block)\.(ln1|ln2|ffn\.layers\.0\.0|ffn\.layers\.1)\.')
_MMPRETRAIN_BLOCK_NAMES = {
    'ln1': 'norm1', 'ln2': 'norm2', 'ffn.layers.0.0': 'mlp.fc1', 'ffn.layers.1': 'mlp.fc2'}


def _from_mmpretrain_key(key: str) -> str:
    """`backbone.trans_1.ffn.layers.1.weight` -> `trans_1.mlp.fc2.weight`; all other keys are
    the paper's."""
    key = key.removeprefix('backbone.').removeprefix('head.')
    return _MMPRETRAIN_BLOCK_KEY.sub(lambda m: f'{m[1]}.{_MMPRETRAIN_BLOCK_NAMES[m[2]]}.', key)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor],
                         model: 'Conformer') -> Dict[str, torch.Tensor]:
    """Map a Conformer state_dict in any known key layout onto `model`.

    Takes the paper's keys (also under DDP `module.` / torch.compile `_orig_mod.` prefixes)
    and mmpretrain's (`backbone.` / `head.` prefixes, mmcv names in the transformer blocks).
    Heads trained for another num_classes, or absent from a backbone saved without them, keep
    the model's fresh initialisation (num_classes=0: dropped) and a stem trained on another
    channel count is adapted to the model's in_chans, each with one log line, so the result
    loads strictly. Any other shape mismatch (weights of
    another variant) is left in place for the loader to report.

    Args:
        state_dict: the weights to map.
        model: the model they are to load into.

    Returns:
        The mapped state_dict.
    """
    state_dict = clean_state_dict(state_dict)
    if any(k.startswith('backbone.') for k in state_dict):
        state_dict = {_from_mmpretrain_key(k): v for k, v in state_dict.items()}
        _logger.info("Renamed mmpretrain Conformer keys to the paper's")
    target = model.state_dict()

    stem, want = state_dict.get('conv1.weight'), target['conv1.weight']
    if (stem is not None and stem.shape[1] != want.shape[1]
            and stem.shape[0] == want.shape[0] and stem.shape[2:] == want.shape[2:]):
        state_dict['conv1.weight'] = adapt_input_conv(want.shape[1], stem, base_chans=stem.shape[1])
        _logger.info(f'Adapted the pretrained stem conv1 from {stem.shape[1]} to '
                     f'{want.shape[1]} input channels')

    head_keys = [f'{head}.{p}' for head in ('conv_cls_head', 'trans_cls_head')
                 for p in ('weight', 'bias')]
    # a head of another class count has the same input width; any other difference means
    # another variant, reported by the loader
    other_classes = [k for k in head_keys if k in state_dict and (
        k not in target or (state_dict[k].shape != target[k].shape
                            and state_dict[k].shape[1:] == target[k].shape[1:]))]
    if model.num_classes and 'cls_token' in state_dict and not any(
            k in state_dict for k in head_keys):
        # a backbone saved without heads (num_classes=0, e.g. self-supervised pretraining)
        state_dict.update({k: target[k] for k in head_keys})
        _logger.info('Pretrained weights have no heads: conv_cls_head and trans_cls_head '
                     'start from random init')
    elif other_classes:
        pretrained_classes = state_dict[other_classes[0]].shape[0]
        for k in other_classes:
            if k in target:
                state_dict[k] = target[k]
            else:
                del state_dict[k]
        _logger.info(
            f'Pretrained heads have {pretrained_classes} classes, the model '
            f'{model.num_classes}: ' + ('dropped them (num_classes=0 returns features)'
                                       if not model.num_classes else
                                       'conv_cls_head and trans_cls_head start from random init'))
    return state_dict


def check_model_name(name: str) -> str:
    """Return ``name`` if ``timm.create_model`` can build it as a Conformer: a registered
    variant, optionally with a weights tag (``conformer_small_patch16.in1k``), or an
    ``hf-hub:`` / ``local-dir:`` source (whose files the weights loader checks).

    Args:
        name: a model name as given to ``timm.create_model``.

    Raises:
        ValueError: listing what to pass, where timm would raise from deep inside.
    """
    source, model_name = parse_model_name(name)  # its ValueError already names the fix
    if source is not None:
        return name
    variant, tag = split_model_name_tag(model_name)
    variants = list_models('conformer_*')
    if variant not in variants:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(variants)}")
    tagged = list_pretrained(f'{variant}.*')
    if tag and model_name not in tagged:
        raise ValueError(f"{variant} has no weights tagged {tag!r}; "
                         f"choose one of {', '.join(tagged) or variant + ' (untagged)'}")
    return name


def _create_conformer(variant: str, pretrained: bool = False, **kwargs) -> Conformer:
    return build_model_with_cfg(
        Conformer, variant, pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': .875, 'crop_mode': 'center', 'interpolation': 'bicubic',
        'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': ('conv_cls_head', 'trans_cls_head'),
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2105.03889',
        'paper_name': 'Conformer: Local Features Coupling Global Representations for '
                      'Visual Recognition',
        'origin_url': 'https://github.com/pengzhiliang/Conformer',
        **kwargs,
    }


# The paper's ImageNet-1k weights as converted and evaluated by mmpretrain (the suffix of each
# file name is the start of its sha256, checked on download). Top-1: mmpretrain's model zoo.
_MMPRETRAIN_URL = 'https://download.openmmlab.com/mmclassification/v0/conformer/'

default_cfgs = generate_default_cfgs({
    'conformer_tiny_patch16.in1k': _cfg(
        url=_MMPRETRAIN_URL + 'conformer-tiny-p16_3rdparty_8xb128_in1k_20211206-f6860372.pth',
        notes=('ImageNet-1k top-1 81.31 (mmpretrain); paper 81.3',)),
    'conformer_small_patch16.in1k': _cfg(
        url=_MMPRETRAIN_URL + 'conformer-small-p16_3rdparty_8xb128_in1k_20211206-3065dcf5.pth',
        notes=('ImageNet-1k top-1 83.32 (mmpretrain); paper 83.4',)),
    'conformer_small_patch32.in1k': _cfg(
        url=_MMPRETRAIN_URL + 'conformer-small-p32_8xb128_in1k_20211206-947a0816.pth',
        notes=('ImageNet-1k top-1 81.96 (mmpretrain)',)),
    'conformer_base_patch16.in1k': _cfg(
        url=_MMPRETRAIN_URL + 'conformer-base-p16_3rdparty_8xb128_in1k_20211206-bfdf8637.pth',
        notes=('ImageNet-1k top-1 83.82 (mmpretrain); paper 84.1',)),
    'conformer_nano_patch4': _cfg(input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0),
})


# The variants, as timm calls them: `pretrained` loads the default tag's weights; keyword
# arguments are `Conformer` arguments overriding the variant's, and timm's model-building options
# (`pretrained_cfg_overlay`, `features_only`, ...).


@register_model
def conformer_tiny_patch16(pretrained: bool = False, **kwargs) -> Conformer:
    """Conformer-Ti: 23.52M parameters, 81.3% ImageNet top-1 (paper)."""
    args = dict(patch_size=16, channel_ratio=1, embed_dim=384, depth=12, num_heads=6)
    return _create_conformer('conformer_tiny_patch16', pretrained, **dict(args, **kwargs))


@register_model
def conformer_small_patch16(pretrained: bool = False, **kwargs) -> Conformer:
    """Conformer-S: 37.67M parameters, 83.4% ImageNet top-1 (paper)."""
    args = dict(patch_size=16, channel_ratio=4, embed_dim=384, depth=12, num_heads=6)
    return _create_conformer('conformer_small_patch16', pretrained, **dict(args, **kwargs))


@register_model
def conformer_small_patch32(pretrained: bool = False, **kwargs) -> Conformer:
    """Conformer-S/32: 38.85M parameters; the paper's detection backbone."""
    args = dict(patch_size=32, channel_ratio=4, embed_dim=384, depth=12, num_heads=6)
    return _create_conformer('conformer_small_patch32', pretrained, **dict(args, **kwargs))


@register_model
def conformer_base_patch16(pretrained: bool = False, **kwargs) -> Conformer:
    """Conformer-B: 83.29M parameters, 84.1% ImageNet top-1 (paper)."""
    args = dict(patch_size=16, channel_ratio=6, embed_dim=576, depth=12, num_heads=9)
    return _create_conformer('conformer_base_patch16', pretrained, **dict(args, **kwargs))


@register_model
def conformer_nano_patch4(pretrained: bool = False, **kwargs) -> Conformer:
    """A 1.7M-parameter Conformer for 28-64 px images (stride-1 stem, 4 px patches), sized
    for training on a laptop CPU; not from the paper."""
    args = dict(patch_size=4, stem_type='small', base_channel=32, channel_ratio=1,
                embed_dim=128, depth=6, num_heads=4)
    return _create_conformer('conformer_nano_patch4', pretrained, **dict(args, **kwargs))

"""Parameter and MAC counts of the registered variants (the README's model table, printed by
``conformer-model-table``).

MACs count every multiply-add of convolutions, matmuls and attention (torch's
FlopCounterMode / 2) at each variant's default input size; norms and activations are left
out, as in the usual ResNet/ViT tables, so the paper's figures are a little higher.
"""
from typing import Dict, List, Optional, Sequence

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# published ImageNet-1k top-1 of the paper's weights (Peng et al. 2021, Table 1; S/32 from
# mmpretrain's model zoo, whose weights are the paper's)
PUBLISHED_TOP1 = {'conformer_tiny_patch16': 81.3, 'conformer_small_patch16': 83.4,
                  'conformer_small_patch32': 81.96, 'conformer_base_patch16': 84.1}


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter has formulas for the CUDA attention kernels only; on a CPU, fp32 SDPA runs
# this op, which it would count as zero
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Floating-point operations of one forward pass (2 per multiply-add).

    Args:
        model: the model to run.
        x: its input batch.
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        model(x)
    return counter.get_total_flops()


def model_table(names: Optional[Sequence[str]] = None) -> List[Dict]:
    """One row per variant in ``names`` (default: every registered one): input size,
    parameters (M), MACs (G) at that size and the published ImageNet top-1, if any.

    Args:
        names: registered model names; None or empty means every Conformer variant.
    """
    rows = []
    for name in names or timm.list_models('conformer_*'):
        model = timm.create_model(name).eval()
        input_size = model.pretrained_cfg['input_size']
        rows.append(dict(
            model=name, input_size=list(input_size),
            params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            macs_g=round(count_flops(model, torch.zeros(1, *input_size)) / 2e9, 2),
            published_top1=PUBLISHED_TOP1.get(name)))
    return rows

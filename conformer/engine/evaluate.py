"""Top-1 of the summed logits (the paper's metric) and of each head, summed over ranks."""
import contextlib
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .distributed import all_sum


def autocast(device: torch.device, amp: str):
    if amp == 'none':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


def head_logits(model: nn.Module, images: torch.Tensor):
    """(conv_logits, trans_logits) in any mode, through the model's public API."""
    pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    conv_head, trans_head = model.get_classifier()
    split = conv_head.in_features
    return conv_head(pooled[:, :split]), trans_head(pooled[:, split:])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: str,
             channels_last: bool = False) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    # sums: loss, correct (combined), correct conv head, correct transformer head, count
    totals = torch.zeros(5, dtype=torch.float64)
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            conv, trans = head_logits(model, images)
        conv, trans = conv.float(), trans.float()
        loss = (F.cross_entropy(conv, target, reduction='sum') +
                F.cross_entropy(trans, target, reduction='sum')) / 2
        totals += torch.tensor([
            loss.item(), ((conv + trans).argmax(1) == target).sum().item(),
            (conv.argmax(1) == target).sum().item(), (trans.argmax(1) == target).sum().item(),
            len(target)], dtype=torch.float64)
    model.train(was_training)
    loss, correct, conv_correct, trans_correct, count = all_sum(totals).tolist()
    if count == 0:
        raise ValueError('the evaluation set is empty')
    return dict(loss=loss / count, top1=100 * correct / count, top1_conv=100 * conv_correct / count,
                top1_trans=100 * trans_correct / count, count=int(count))

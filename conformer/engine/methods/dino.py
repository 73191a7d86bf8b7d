"""DINO self-distillation (Caron et al., ICCV 2021) for the two-branch Conformer.

The student (backbone + projection head, drop path as configured) sees two global and N local
crops of each image; the teacher (a momentum average of the student, without drop path) sees
the two global crops. The student learns to predict, from every crop, the teacher's centred
and sharpened output for each other global crop. Labels are never used for the loss; when the
data has them, a k-NN classifier over the teacher's frozen features judges the representation.

Conformer-specific choices: the head sees the pooled CNN vector, the class token or both
(`method.embedding`); crops of one resolution go through the backbone as one batch, so the CNN
branch's BatchNorm normalises global and local crops separately; drop path is in the student
only. In a multi-process run every rank updates the teacher from the same (all-reduced)
student and all-reduces the centre on the device, so teachers and centres stay identical.
"""
import copy
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from conformer.data.multicrop import MultiCrop

from ..distributed import all_sum
from ..evaluate import autocast
from ..knn import embed, knn_top1_of
from .base import Method

_logger = logging.getLogger(__name__)
TEACHER_KEY = 'state_dict_ema'  # the teacher's backbone: where weights readers look for an EMA
HEAD, TEACHER_HEAD, CENTER = 'dino_head', 'dino_teacher_head', 'dino_center'


class RepresentationCollapsed(FloatingPointError):
    """Self-supervised training collapsed: every image gets the same output."""


class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer MLP (GELU) to an l2-normalised bottleneck, then a
    weight-normalised linear layer to `out_dim` prototypes (its norm fixed at 1 when
    `norm_last_layer`, else learnt)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                trunc_normal_(layer.weight, std=.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        trunc_normal_(self.last_layer.weight, std=.02)
        # weight normalisation's magnitude g; fixed at 1 (a buffer) or learnt
        norm = torch.ones(out_dim, 1)
        if norm_last_layer:
            self.register_buffer('last_layer_norm', norm)
        else:
            self.last_layer_norm = nn.Parameter(norm)

    def last_layer_parameters(self) -> List[nn.Parameter]:
        return [p for p in (self.last_layer.weight, self.last_layer_norm)
                if isinstance(p, nn.Parameter)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        weight = F.normalize(self.last_layer.weight, dim=1) * self.last_layer_norm
        return F.linear(x, weight)


def embedding_dim(model: nn.Module, embedding: str) -> int:
    """Width of `conformer.engine.knn.embed`'s vector."""
    return {'cnn': model.conv_features, 'cls': model.embed_dim,
            'both': model.conv_features + model.embed_dim}[embedding]


class DINONetwork(nn.Module):
    """Backbone + projection head over a list of crops: crops of one size are forwarded as one
    batch (so BatchNorm sees one resolution at a time), their outputs concatenated in order."""

    def __init__(self, backbone: nn.Module, head: DINOHead, embedding: str):
        super().__init__()
        self.backbone, self.head, self.embedding = backbone, head, embedding

    def no_weight_decay(self) -> set:
        return {f'backbone.{name}' for name in self.backbone.no_weight_decay()}

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        groups: List[List[torch.Tensor]] = []
        for crop in crops:
            if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
                groups[-1].append(crop)
            else:
                groups.append([crop])
        embedded = [embed(self.backbone, torch.cat(group), self.embedding)
                    for group in groups]
        return self.head(torch.cat(embedded))


def cosine(start: float, end: float, step: int, total: int) -> float:
    """DINO's cosine schedule from `start` (step 0) to `end` (step `total`)."""
    return end + (start - end) * (1 + math.cos(math.pi * min(step, total) / max(total, 1))) / 2


class DINO(Method):
    """Self-distillation with no labels; see the module docstring.

    The logged window adds `std` (the spread of the student's l2-normalised outputs for the
    global crops over the batch: the mean per-dimension standard deviation times
    sqrt(out_dim), about 1 for outputs spread over the sphere and 0 when every image gets the
    same output) and `teacher_entropy` (nats; log(out_dim) is uniform, 0 one-hot). The run
    stops when `std` falls below method.collapse_std.
    """
    name = 'dino'
    sums = ('std', 'teacher_entropy', 'teacher_temp', 'momentum')

    def __init__(self, cfg):
        super().__init__(cfg)
        self.m = cfg.method
        self.student: Optional[DINONetwork] = None
        self.teacher: Optional[DINONetwork] = None
        self.center = torch.zeros(1, self.m.out_dim)
        # the teacher's output summed over this step's micro-batches: the centre moves once per
        # optimizer step, towards the mean over the global batch (all ranks, all micro-batches)
        self.step_sum = torch.zeros(1, self.m.out_dim)
        self.step_count = 0
        self.decayed: Optional[List[bool]] = None  # which optimizer groups have weight decay

    def num_classes(self, classes: Sequence[str]) -> int:
        return 0  # the backbone's heads are left out; fine-tuning makes new ones

    def attach(self, model: nn.Module, saved: Optional[Dict[str, Any]], origin: str) -> nn.Module:
        m = self.m
        head = DINOHead(embedding_dim(model, m.embedding), m.out_dim, m.hidden_dim,
                        m.bottleneck_dim, m.norm_last_layer)
        self.student = DINONetwork(model, head, m.embedding)
        self.teacher = copy.deepcopy(self.student)  # DINO starts the teacher as the student
        for module in self.teacher.modules():  # no stochastic depth or dropout in the teacher
            if isinstance(module, DropPath):
                module.drop_prob = 0.
            elif isinstance(module, nn.Dropout):
                module.p = 0.
        self.teacher.requires_grad_(False)
        if saved is not None:
            missing = [k for k in (HEAD, TEACHER_KEY, TEACHER_HEAD, CENTER) if k not in saved]
            if missing:
                raise ValueError(f'{origin} was not saved by a method=dino run (it lacks '
                                 f'{", ".join(missing)}); start a new run from its weights with '
                                 f'model.checkpoint=<file>')
            head.load_state_dict(saved[HEAD])
            self.teacher.backbone.load_state_dict(saved[TEACHER_KEY])
            self.teacher.head.load_state_dict(saved[TEACHER_HEAD])
            self.center = saved[CENTER].clone()
        return self.student

    def to(self, device: torch.device) -> None:
        self.teacher.to(device)
        if self.cfg.model.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        self.center = self.center.to(device)
        self.step_sum = self.step_sum.to(device)

    def bn_modules(self) -> List[nn.Module]:
        return [self.teacher]

    def transform(self) -> MultiCrop:
        m, data = self.m, self.cfg.data
        return MultiCrop(m.global_size, m.local_size, m.local_crops, m.global_scale,
                         m.local_scale, data.mean, data.std, data.interpolation)

    def teacher_temp(self, epoch: int) -> float:
        """Linear warm-up over the first epochs, per epoch as DINO."""
        m = self.m
        if epoch < m.warmup_teacher_temp_epochs:
            return float(np.linspace(m.warmup_teacher_temp, m.teacher_temp,
                                     m.warmup_teacher_temp_epochs)[epoch])
        return m.teacher_temp

    def total_steps(self, run) -> int:
        return self.cfg.trainer.epochs * run.sampler.steps_per_epoch

    def step(self, run, state, batch):
        crops, _ = batch  # targets (if any) are not used
        device = run.env.device
        crops = [c.to(device, non_blocking=True) for c in crops]
        if self.cfg.model.channels_last:
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        with autocast(device, run.amp):
            student = run.forward(crops)
            with torch.no_grad():
                teacher = self.teacher(crops[:2])
        temp = self.teacher_temp(state.epoch)
        loss, probs = self.loss(student.float(), teacher.float(), temp, len(crops))
        images = len(crops[0])
        with torch.no_grad():
            self.step_sum += teacher.float().sum(0, keepdim=True)
            self.step_count += len(teacher)
            outputs = F.normalize(student[:len(teacher)].float(), dim=-1)  # global crops
            spread = outputs.std(0).mean() * math.sqrt(self.m.out_dim)
            entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1).mean()
            momentum = torch.tensor(self.momentum(state.step, run), device=device)
            sums = torch.stack([spread, entropy, torch.tensor(temp, device=device), momentum])
        return loss, images, sums * images

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, temp: float,
             crops: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy between the teacher's centred, sharpened distribution for each global
        crop and the student's for every other crop, averaged over the pairs; and the
        teacher's distributions."""
        student_log = F.log_softmax(student / self.m.student_temp, dim=-1).chunk(crops)
        probs = F.softmax((teacher - self.center) / temp, dim=-1)
        total, pairs = 0., 0
        for i, target in enumerate(probs.chunk(2)):
            for j, log_p in enumerate(student_log):
                if i != j:
                    total = total + (-target * log_p).sum(-1).mean()
                    pairs += 1
        return total / pairs, probs

    @torch.no_grad()
    def update_center(self) -> None:
        """EMA of the teacher's mean output over the global batch, all-reduced on the device
        (every rank computes the same centre)."""
        sums = all_sum(self.step_sum.clone())
        count = self.step_count * run_world_size()
        self.step_sum.zero_()
        self.step_count = 0
        if self.m.centering:
            momentum = self.m.center_momentum
            self.center = self.center * momentum + sums / count * (1 - momentum)

    def momentum(self, step: int, run) -> float:
        """The teacher's momentum after optimizer step `step` (from 0): 0.996 -> 1, cosine."""
        return cosine(self.m.momentum_teacher, 1., step, self.total_steps(run))

    def before_update(self, run, state) -> None:
        total = self.total_steps(run)
        decay = cosine(self.cfg.optim.weight_decay, self.m.weight_decay_end, state.step, total)
        groups = run.optimizer.param_groups
        if self.decayed is None:  # timm's no-decay groups (biases, norms, tokens) stay at 0
            self.decayed = [group['weight_decay'] > 0 for group in groups]
        for group, decayed in zip(groups, self.decayed):
            if decayed:
                group['weight_decay'] = decay
        if state.epoch < self.m.freeze_last_layer:  # DINO: stabler start
            for p in self.student.head.last_layer_parameters():
                p.grad = None

    @torch.no_grad()
    def after_update(self, run, state) -> None:
        self.update_center()
        momentum = self.momentum(state.step - 1, run)
        teacher = list(self.teacher.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, list(self.student.parameters()), alpha=1 - momentum)

    def check(self, record: Dict[str, float], state) -> None:
        m = self.m
        if state.step < m.collapse_after or record['std'] >= m.collapse_std:
            return
        entropy, uniform = record['teacher_entropy'], math.log(m.out_dim)
        if entropy > 0.9 * uniform:
            kind = ('towards the uniform distribution (sharpening lost: lower '
                    'method.teacher_temp / method.warmup_teacher_temp)')
        elif not m.centering:
            kind = 'onto a few dimensions (centring prevents this: set method.centering=true)'
        else:
            kind = ('onto a few dimensions despite centring (raise method.momentum_teacher or '
                    'lower optim.lr; method.collapse_after delays this check past a slow start)')
        raise RepresentationCollapsed(
            f'the representation collapsed by epoch {state.epoch} step {state.step}: the '
            f'student gives every image nearly the same output (spread {record["std"]:.3g} '
            f'below method.collapse_std={m.collapse_std}; outputs spread over the sphere give '
            f"1) and the teacher's entropy is {entropy:.3g} nats of at most {uniform:.3g}, so "
            f'it collapsed {kind}. Stopped; latest checkpoint: {state.checkpoint or "none yet"}')

    def split_state(self, full):
        model = {k[len('backbone.'):]: v for k, v in full.items() if k.startswith('backbone.')}
        head = {k[len('head.'):]: v for k, v in full.items() if k.startswith('head.')}
        return model, {HEAD: head}

    def state(self) -> Dict[str, Any]:
        cpu = lambda module: {k: v.detach().cpu() for k, v in module.state_dict().items()}  # noqa
        return {TEACHER_KEY: cpu(self.teacher.backbone), TEACHER_HEAD: cpu(self.teacher.head),
                CENTER: self.center.detach().cpu()}

    def evaluate(self, run, epoch: int, step: int) -> Dict[str, float]:
        """k-NN top-1 of the teacher's backbone features (DINO evaluates the teacher) when the
        training images have labels."""
        top1 = knn_top1_of(self.teacher.backbone, self.m.embedding, run.train_set,
                           run.eval_set, run.cfg, run.env, run.amp, k=self.m.knn_k,
                           temperature=self.m.knn_temperature)
        metrics = {} if top1 is None else {'knn_top1': top1}
        if top1 is None:
            _logger.info('k-NN skipped: the training images carry no labels')
        run.logger.log('eval', step, epoch=epoch, **metrics)
        return metrics

    def headline(self, metrics: Dict[str, float]) -> float:
        return metrics.get('knn_top1', -1.0)

    def summary(self, metrics: Dict[str, float], epoch: int, step: int) -> str:
        if 'knn_top1' not in metrics:
            return f'epoch {epoch} step {step}: no labels, no k-NN evaluation'
        return f'epoch {epoch} step {step}: k-NN top-1 {metrics["knn_top1"]:.2f}% (teacher)'


def run_world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

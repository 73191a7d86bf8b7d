"""Faster R-CNN / Mask R-CNN on a Conformer + FPN backbone: tiny models, synthetic images."""
import pytest
import timm
import torch
from torch import nn

from conformer.models.detection import (
    ConformerFPN,
    conformer_faster_rcnn,
    conformer_fpn_backbone,
    conformer_mask_rcnn,
)

VARIANT = 'conformer_small_patch32'
# a ~0.4M-parameter Conformer with the paper's stride-4 stem: taps at strides 4/8/16/32
TINY = dict(base_channel=16, channel_ratio=1, embed_dim=64, num_heads=2, depth=6)
# images small enough to need no resizing, and few sampled proposals, keep a CPU step to
# seconds; a zero score threshold makes even an untrained model return detections
HEADS = dict(min_size=96, max_size=128, rpn_pre_nms_top_n_train=200,
             rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
             rpn_post_nms_top_n_test=100, box_batch_size_per_image=32,
             box_detections_per_img=10, box_score_thresh=0.0)
NUM_CLASSES = 3  # background + 2
IMAGE_SIZES = [(96, 128), (128, 96)]
DETECTORS = {
    'faster_rcnn': (conformer_faster_rcnn,
                    {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}),
    'mask_rcnn': (conformer_mask_rcnn,
                  {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg',
                   'loss_mask'}),
}


def synthetic_batch():
    """Two differently shaped images, each with two boxes and their rectangle masks."""
    torch.manual_seed(0)
    images, targets = [], []
    for h, w in IMAGE_SIZES:
        boxes = torch.tensor([[8., 10., 60., 50.], [30., 40., 90., 88.]])
        masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
        images.append(torch.rand(3, h, w))
        targets.append(dict(boxes=boxes, labels=torch.tensor([1, 2]), masks=masks))
    return images, targets


def build_detector(name):
    torch.manual_seed(0)
    builder, _ = DETECTORS[name]
    return builder(NUM_CLASSES, VARIANT, backbone_kwargs=dict(TINY, out_channels=64), **HEADS)


def batch_norms(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize('variant', [VARIANT, VARIANT + '.in1k'])  # a pretrained tag is fine
def test_backbone_returns_five_fpn_levels_at_strides_4_to_64(variant):
    backbone = conformer_fpn_backbone(variant, out_channels=32, **TINY).eval()
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, 128, 96))
    assert backbone.out_channels == 32
    assert list(out) == ['0', '1', '2', '3', 'pool']
    # 128x96 at strides 4, 8, 16, 32; the pooled level is a stride-2 1x1 max pool of 4x3
    assert [tuple(v.shape) for v in out.values()] == [
        (2, 32, 32, 24), (2, 32, 16, 12), (2, 32, 8, 6), (2, 32, 4, 3), (2, 32, 2, 2)]


def test_fpn_receives_timms_features_only_maps():
    """The FPN sees exactly what timm's features_only extractor of the same weights gives."""
    backbone = conformer_fpn_backbone(VARIANT, **TINY).eval()
    reference = timm.create_model(VARIANT, features_only=True, **TINY).eval()
    reference.model.load_state_dict(backbone.body.state_dict())
    seen = []
    backbone.fpn.register_forward_pre_hook(lambda _, args: seen.append(list(args[0].values())))
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        backbone(x)
        expected = reference(x)
    assert len(seen[0]) == len(expected) == 4
    for got, want in zip(seen[0], expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize('name', DETECTORS)
def test_training_step_updates_the_conformer(name):
    detector = build_detector(name).train()
    body = detector.backbone.body
    assert not any(bn.training for bn in batch_norms(body)), 'norm_eval keeps BN in eval mode'
    running_means = [bn.running_mean.clone() for bn in batch_norms(body)]
    images, targets = synthetic_batch()

    losses = detector(images, targets)
    assert set(losses) == DETECTORS[name][1]
    for key, loss in losses.items():
        assert torch.isfinite(loss), f'{key} = {loss}'
    sum(losses.values()).backward()
    params = dict(body.named_parameters())
    no_grad = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f'no gradient reached {no_grad}'

    before = {n: p.detach().clone() for n, p in params.items()}
    torch.optim.SGD(detector.parameters(), lr=0.01).step()
    unchanged = [n for n, p in params.items() if torch.equal(p, before[n])]
    assert not unchanged, f'the optimizer step left {unchanged} unchanged'
    for bn, mean in zip(batch_norms(body), running_means):
        torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0)


@pytest.mark.parametrize('name', DETECTORS)
def test_inference_returns_detections_in_image_coordinates(name):
    detector = build_detector(name).eval()
    images, _ = synthetic_batch()
    with torch.no_grad():
        outputs = detector(images)
    assert len(outputs) == len(images)
    for out, (h, w) in zip(outputs, IMAGE_SIZES):
        n = len(out['boxes'])
        assert 0 < n <= HEADS['box_detections_per_img']
        assert out['boxes'].shape == (n, 4) and out['labels'].shape == out['scores'].shape == (n,)
        boxes = out['boxes']
        assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, :2] <= boxes[:, 2:]).all()
        assert ((out['labels'] >= 1) & (out['labels'] < NUM_CLASSES)).all()
        assert ((out['scores'] >= 0) & (out['scores'] <= 1)).all()
        if name == 'mask_rcnn':
            masks = out['masks']  # per-detection probabilities pasted back at image size
            assert masks.shape == (n, 1, h, w)
            assert ((masks >= 0) & (masks <= 1)).all()
        else:
            assert 'masks' not in out


@pytest.mark.parametrize('norm_eval', [True, False])
def test_norm_eval_freezes_batchnorm_statistics(norm_eval):
    backbone = conformer_fpn_backbone(VARIANT, out_channels=16, norm_eval=norm_eval, **TINY)
    # a new module is in training mode before anyone calls train(): it must hold there too
    assert all(bn.training != norm_eval for bn in batch_norms(backbone.body))
    backbone.eval().train()
    assert all(bn.training != norm_eval for bn in batch_norms(backbone.body))
    before = [bn.running_var.clone() for bn in batch_norms(backbone.body)]
    backbone(torch.rand(2, 3, 64, 64))
    changed = [not torch.equal(bn.running_var, v)
               for bn, v in zip(batch_norms(backbone.body), before)]
    assert all(c != norm_eval for c in changed)


@pytest.mark.parametrize('trainable_blocks, trainable_prefixes', [
    (0, ()),
    (2, ('conv_trans_5.', 'conv_trans_6.')),
    (6, ('conv_1.', 'trans_1.', 'conv_trans_')),  # everything but the stem
])
def test_trainable_blocks_freezes_the_stem_and_early_blocks(trainable_blocks,
                                                            trainable_prefixes):
    backbone = conformer_fpn_backbone(VARIANT, out_channels=16, norm_eval=False,
                                      trainable_blocks=trainable_blocks, **TINY)
    names = [n for n, _ in backbone.body.named_parameters()]
    trainable = [n for n, p in backbone.body.named_parameters() if p.requires_grad]
    assert trainable == [n for n in names if n.startswith(trainable_prefixes)]
    assert all(p.requires_grad for p in backbone.fpn.parameters())

    # without norm_eval, only the trainable blocks' BN statistics move
    backbone.train()
    bns = dict((n, m) for n, m in backbone.body.named_modules() if isinstance(m, nn.BatchNorm2d))
    before = {n: bn.running_mean.clone() for n, bn in bns.items()}
    backbone(torch.rand(2, 3, 64, 64))
    moved = sorted(n for n, bn in bns.items() if not torch.equal(bn.running_mean, before[n]))
    assert moved == sorted(n for n in bns if (n + '.').startswith(trainable_prefixes))


@pytest.mark.parametrize('build, match', [
    (lambda: conformer_fpn_backbone('resnet18'), r"unknown Conformer variant 'resnet18'"),
    (lambda: conformer_fpn_backbone('conformer_nano_patch4'),  # stride-1 stem
     r'taps at strides \[4, 8, 16, 32\], but this Conformer has them at \[1, 2, 4, 8\]'),
    (lambda: conformer_fpn_backbone(VARIANT, **dict(TINY, depth=3)),
     r'depth must be a multiple of 3 and at least 6'),
    (lambda: conformer_fpn_backbone(VARIANT, trainable_blocks=7, **TINY),
     r'trainable_blocks must be an integer from 0 .* depth 6'),
    (lambda: conformer_fpn_backbone(VARIANT, out_channels=0, **TINY),
     r'out_channels must be a positive integer'),
    (lambda: conformer_mask_rcnn(1, backbone_kwargs=TINY),
     r'for K object classes pass K \+ 1'),
])
def test_bad_arguments_raise_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_body_must_be_a_conformer():
    with pytest.raises(TypeError, match='needs a conformer.models.Conformer body, got Conv2d'):
        ConformerFPN(nn.Conv2d(3, 8, 3))


def test_a_rejected_body_keeps_its_classifier():
    body = timm.create_model(VARIANT, num_classes=5, **TINY)
    with pytest.raises(ValueError, match='trainable_blocks'):
        ConformerFPN(body, trainable_blocks=-1)
    assert body.num_classes == 5 and body(torch.rand(1, 3, 64, 64)).shape == (1, 5)

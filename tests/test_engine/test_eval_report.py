"""conformer-eval reports top-5, per-class top-1 and the confusion matrix (JSON and PNG), checked
against the model's own logits; training's evaluation keeps its lean loop."""
import json
import os
import subprocess
import sys

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from conformer.engine.evaluate import evaluate, head_logits, per_class_accuracy

from helpers import REPO
from helpers.image_folders import make_folder


def test_top5_and_the_confusion_matrix_match_the_summed_logits():
    torch.manual_seed(0)
    model = timm.create_model('conformer_nano_patch4', num_classes=7, base_channel=8,
                              embed_dim=16, num_heads=2, depth=6).eval()
    images, target = torch.randn(23, 3, 16, 16), torch.randint(0, 7, (23,))
    loader = DataLoader(TensorDataset(images, target), batch_size=5)
    result = evaluate(model, loader, torch.device('cpu'), 'none', num_classes=7)
    with torch.no_grad():
        logits = sum(head_logits(model, images))
    predicted = logits.argmax(1)
    expected = [[int(((target == t) & (predicted == p)).sum()) for p in range(7)]
                for t in range(7)]
    assert result['confusion'] == expected
    in_top5 = (logits.topk(5, 1).indices == target[:, None]).any(1).double().mean() * 100
    assert abs(result['top5'] - in_top5.item()) < 1e-9
    assert abs(result['top1'] - 100 * (predicted == target).double().mean().item()) < 1e-9
    per_class = per_class_accuracy(result['confusion'], list('abcdefg'))
    for index, name in enumerate('abcdefg'):
        mine = target == index
        assert per_class[name] == (100 * (predicted[mine] == index).double().mean().item()
                                   if mine.any() else None)
    lean = evaluate(model, loader, torch.device('cpu'), 'none')  # as training calls it
    assert 'confusion' not in lean and lean['top1'] == result['top1']


def test_conformer_eval_writes_the_report_files_and_names_them(tmp_path):
    images = make_folder(tmp_path / 'images', classes=3, per_class=4)
    common = ['model=conformer_nano_patch4', 'model.base_channel=8', 'model.embed_dim=16',
              'model.num_heads=2', 'model.depth=6', 'data.input_size=16', 'data.num_workers=0',
              'aug=small', f'data.root={images}']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    run = dict(cwd=tmp_path, text=True, capture_output=True, timeout=300, env=env)
    trained = subprocess.run([sys.executable, str(REPO / 'tools' / 'train.py'), *common,
                              'data.batch_size=4', 'trainer.max_steps=1', 'logging.plot=false',
                              'logging.progress=false', f'hydra.run.dir={tmp_path}/run'], **run)
    assert trained.returncode == 0, trained.stderr
    result = subprocess.run([sys.executable, str(REPO / 'tools' / 'eval.py'), *common,
                             f'checkpoint={tmp_path}/run/checkpoints/last.pth', 'device=cpu',
                             f'hydra.run.dir={tmp_path}/eval'], **run)
    assert result.returncode == 0, result.stderr
    assert 'evaluating:' in result.stderr and '0/1 [' in result.stderr  # the progress bar
    report = json.loads((tmp_path / 'eval' / 'eval.json').read_text())
    confusion = json.loads((tmp_path / 'eval' / 'confusion.json').read_text())
    matrix = confusion['matrix']
    assert confusion['classes'] == report['classes'] == ['class0', 'class1', 'class2']
    assert sum(map(sum, matrix)) == report['count'] == 6
    assert abs(100 * sum(matrix[i][i] for i in range(3)) / 6 - report['top1']) < 1e-9
    assert report['top5'] == 100.0 and report['device'] == 'cpu' and report['split'] == 'val'
    assert set(report['per_class_top1']) == {'class0', 'class1', 'class2'}
    assert (tmp_path / 'eval' / 'confusion.png').stat().st_size > 5_000
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f'val top-1 {report["top1"]:.2f}%, top-5 100.00%')
    for name in ('eval.json', 'confusion.png', 'confusion.json'):
        assert str(tmp_path / 'eval' / name) in line

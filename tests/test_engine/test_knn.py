"""The k-NN evaluation (cosine, k nearest, votes weighted by exp(similarity / T), as DINO)
against hand-computed votes and a one-hot reference, and the conformer-knn command."""
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from conformer.engine.knn import knn_classify, knn_top1

from helpers import REPO
from helpers.image_folders import make_folder


def test_the_vote_is_weighted_by_exp_similarity_over_temperature():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.0]])  # similarities 1, 0.8, 0.6, 0
    # k=3, T=0.07: class 0 gets e^(1/0.07) = e^14.29, class 1 e^11.43 + e^8.57: class 0 wins
    assert knn_classify(bank, labels, query, 2, k=3, temperature=0.07).tolist() == [0]
    # T=1: e^1 = 2.718 against e^0.8 + e^0.6 = 4.048: the two weaker neighbours win
    assert knn_classify(bank, labels, query, 2, k=3, temperature=1.0).tolist() == [1]
    # k=1: the nearest alone
    assert knn_classify(bank, labels, query, 2, k=1, temperature=1.0).tolist() == [0]


def reference_knn(bank, labels, queries, num_classes, k, temperature):
    """DINO's formulation: one-hot labels of the top-k, weighted, summed, the largest taken."""
    similarity = queries @ bank.T
    top, index = similarity.topk(k, dim=1)
    one_hot = F.one_hot(labels[index], num_classes).double()
    return (one_hot * (top.double() / temperature).exp()[..., None]).sum(1).argmax(1)


def test_knn_matches_the_one_hot_reference_at_k20_t007():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(5, 16), dim=1)
    labels = torch.randint(0, 5, (300,))
    bank = F.normalize(centres[labels] + 0.6 * torch.randn(300, 16), dim=1)
    query_labels = torch.randint(0, 5, (70,))
    queries = F.normalize(centres[query_labels] + 0.6 * torch.randn(70, 16), dim=1)
    predicted = knn_classify(bank.double(), labels, queries.double(), 5, k=20, temperature=0.07,
                             chunk=16)  # several chunks
    expected = reference_knn(bank.double(), labels, queries.double(), 5, 20, 0.07)
    assert torch.equal(predicted, expected)
    top1 = knn_top1(bank.double(), labels, queries.double(), query_labels, 20, 0.07)
    assert top1 == 100 * (expected == query_labels).double().mean().item()
    assert 50 < top1 < 100  # a task the features half solve: the test can fail either way


def test_the_knn_command_on_pixels_matches_the_library(tmp_path):
    root = make_folder(tmp_path / 'images')
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools' / 'knn.py'), f'data.root={root}',
         'data.input_size=16', 'data.crop_pct=1.0', 'data.num_workers=0', 'weights=pixels',
         'k=5', f'hydra.run.dir={tmp_path / "run"}'],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / 'run' / 'knn.json').read_text())
    assert result['bank'] == 36 and result['count'] == 18 and result['k'] == 5
    assert f'k-NN top-1 {result["knn_top1"]:.2f}%' in proc.stdout
    assert result['knn_top1'] > 90  # one noisy colour per class: pixels separate them

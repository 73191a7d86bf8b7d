"""k-NN evaluation of a frozen representation, as DINO reports it: cosine similarity, the k
nearest training images vote for their labels with weights exp(similarity / T).

Used as the metric logged during self-supervised pretraining and by `conformer-knn` on any
checkpoint (its teacher/EMA or its model, the same architecture at random initialisation,
or raw pixels), so that all of them are measured by one tool:

    conformer-knn checkpoint=outputs/dino/checkpoints/last.pth data=fashion_mnist
    conformer-knn checkpoint=outputs/dino/checkpoints/last.pth weights=random
    conformer-knn data=fashion_mnist weights=pixels
"""
import logging
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from conformer.data import build_datasets
from conformer.models.conformer import checkpoint_filter_fn
from conformer.weights import load_state_dict_checked

from .build import build_model, describe_from_weights, eval_loader, saved_ema, set_threads
from .checkpoint import load
from .config import check
from .distributed import init_distributed
from .evaluate import autocast, resolve_amp

_logger = logging.getLogger(__name__)


def embed(model: nn.Module, images: torch.Tensor, embedding: str) -> torch.Tensor:
    """The backbone's image vector: the pooled CNN vector ('cnn'), the class token ('cls') or
    both concatenated ('both', CNN first).

    Args:
        model: a Conformer.
        images: the input batch.
        embedding: 'cnn', 'cls' or 'both'.
    """
    pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    split = model.conv_features
    return {'cnn': pooled[:, :split], 'cls': pooled[:, split:], 'both': pooled}[embedding]


def knn_features(model: nn.Module, images: torch.Tensor, embedding: str) -> torch.Tensor:
    """l2-normalised features for k-NN; with 'both', each branch's vector is normalised before
    they are joined, so that neither dominates the cosine by its scale."""
    vector = embed(model, images, embedding).float()
    if embedding == 'both':
        split = model.conv_features
        vector = torch.cat([F.normalize(vector[:, :split], dim=1),
                            F.normalize(vector[:, split:], dim=1)], dim=1)
    return F.normalize(vector, dim=1)


@torch.no_grad()
def extract(features: Callable[[torch.Tensor], torch.Tensor], dataset, cfg, env,
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every image of `dataset` through the eval transform, in dataset
    order; each rank extracts its shard and every rank gets them all."""
    loader = eval_loader(dataset, cfg.data, cfg.aug, env.rank, env.world_size)
    feats, labels = [], []
    for images, target in loader:
        images = images.to(env.device, non_blocking=True)
        feats.append(features(images).float().cpu())
        labels.append(torch.as_tensor(target))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if not env.enabled:
        return feats, labels
    shards = [None] * env.world_size
    dist.all_gather_object(shards, (feats, labels))
    every = torch.empty(len(dataset), feats.shape[1])
    every_labels = torch.empty(len(dataset), dtype=labels.dtype)
    for rank, (f, lab) in enumerate(shards):  # ShardSampler: rank r holds r, r + W, ...
        every[rank::env.world_size], every_labels[rank::env.world_size] = f, lab
    return every, every_labels


def knn_classify(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 256) -> torch.Tensor:
    """Predicted class of each query: its k most cosine-similar bank entries vote for their
    labels with weight exp(similarity / temperature) (DINO's weighted k-NN).

    Args:
        bank: l2-normalised features (N, D) of the labelled images.
        bank_labels: their classes (N,).
        queries: l2-normalised features (M, D).
        num_classes: classes of the labels.
        k: neighbours that vote.
        temperature: sharpness of the vote weights.
        chunk: queries compared at a time (memory: chunk x N similarities).
    """
    k = min(k, len(bank))
    predictions = []
    for part in queries.split(chunk):
        similarity, index = (part @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(part), num_classes, dtype=similarity.dtype)
        votes.scatter_add_(1, bank_labels[index], (similarity / temperature).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
             query_labels: torch.Tensor, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 (percent) of `knn_classify` on labelled queries."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    predicted = knn_classify(bank, bank_labels, queries, num_classes, k, temperature)
    return 100 * (predicted == query_labels).double().mean().item()


def knn_top1_of(model: nn.Module, embedding: str, bank_set, query_set, cfg, env, amp: str,
                k: int = 20, temperature: float = 0.07) -> Optional[float]:
    """k-NN top-1 of `model`'s frozen features (eval mode): the training images with their
    labels are the bank, the eval images the queries. None, before any work, when there is no
    eval split or either split's images carry no labels (-1)."""
    if query_set is None or any(len(s) and int(torch.as_tensor(s.targets).min()) < 0
                                for s in (bank_set, query_set)):
        return None
    was_training = model.training
    model.eval()
    try:
        def features(images):
            if cfg.model.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(env.device, amp):
                return knn_features(model, images, embedding)
        bank, bank_labels = extract(features, bank_set, cfg, env)
        queries, query_labels = extract(features, query_set, cfg, env)
    finally:
        model.train(was_training)
    return knn_top1(bank, bank_labels, queries, query_labels, k, temperature)


def evaluate_knn(cfg) -> Dict[str, Any]:
    """k-NN top-1 of the configured features on the eval split, the training split as the
    bank (conformer-knn).

    Args:
        cfg: a `KnnConfig`.
    """
    state = load(cfg.checkpoint, 'checkpoint', required=('model',)) if cfg.checkpoint else None
    if state is not None and 'variant' in state.get('meta', {}):
        describe_from_weights(cfg, 'checkpoint', state['meta'])
    if cfg.weights == 'random' and state is None:
        raise ValueError('weights=random takes its architecture from a checkpoint: pass '
                         'checkpoint=<a .pth written by conformer-train>')
    embedding = cfg.embedding
    if embedding is None:  # what the checkpoint's projection head saw, else both branches
        saved = (state or {}).get('config', {}).get('method', {})
        embedding = saved.get('embedding', 'both') if saved.get('name') == 'dino' else 'both'
    if embedding not in ('cnn', 'cls', 'both'):
        raise ValueError(f"embedding={embedding!r}; choose one of ['cnn', 'cls', 'both']")
    if cfg.weights != 'pixels':
        check(cfg)
    set_threads(cfg.threads)
    env = init_distributed(cfg.device, 'device')
    amp = resolve_amp(cfg.amp, env.device)
    bank_set, query_set, classes = build_datasets(cfg.data)
    if cfg.weights == 'pixels':
        features = lambda images: F.normalize(images.flatten(1).float(), dim=1)  # noqa: E731
        bank, bank_labels = extract(features, bank_set, cfg, env)
        queries, query_labels = extract(features, query_set, cfg, env)
        top1 = knn_top1(bank, bank_labels, queries, query_labels, cfg.k, cfg.temperature)
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, 0, cfg.data.in_chans)
        if cfg.weights != 'random' and state is not None:
            weights = saved_ema(state) if cfg.weights == 'auto' else None
            weights = state['model'] if weights is None else weights
            load_state_dict_checked(model, checkpoint_filter_fn(dict(weights), model),
                                    f'checkpoint={cfg.checkpoint}')
        model.to(env.device)
        top1 = knn_top1_of(model, embedding, bank_set, query_set, cfg, env, amp, cfg.k,
                           cfg.temperature)
        if top1 is None:
            raise ValueError('k-NN needs labelled images: the configured data has none '
                             '(point data.* at a labelled dataset)')
    if cfg.weights == 'pixels':
        embedding = 'pixels'
    return dict(knn_top1=top1, weights=cfg.weights, embedding=embedding, k=cfg.k,
                temperature=cfg.temperature, bank=len(bank_set), count=len(query_set),
                checkpoint=cfg.checkpoint, classes=list(classes))


def _knn(cfg) -> float:
    import json
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    result = evaluate_knn(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / 'knn.json').write_text(json.dumps(result, indent=2) + '\n')
    features = ('raw pixels' if result['weights'] == 'pixels' else
                f'{result["weights"]} weights, {result["embedding"]} embedding')
    print(f'k-NN top-1 {result["knn_top1"]:.2f}% (k={result["k"]}, T={result["temperature"]}, '
          f'{features}; {result["bank"]} labelled bank images, {result["count"]} queries) | '
          f'{run_dir / "knn.json"}')
    return result['knn_top1']


def knn_cli() -> None:
    """conformer-knn: k-NN top-1 of a checkpoint's frozen features (Hydra overrides)."""
    from .cli import _main
    _main('knn', _knn, 'conformer-knn')

"""Hydra entry points behind tools/train.py, tools/eval.py and the conformer-train /
conformer-eval console scripts.

The config tree ships inside the package as `conformer.configs`; from a source checkout
that is not installed, the repository's configs/ folder is used.
"""
import importlib.util
import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import config as _schema  # noqa: F401  (registers train_schema / eval_schema)
from .distributed import launched_rank

_logger = logging.getLogger(__name__)


def config_dir() -> str:
    spec = importlib.util.find_spec('conformer.configs')
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    checkout = Path(__file__).resolve().parents[2] / 'configs'
    if (checkout / 'train.yaml').is_file():
        return str(checkout)
    raise FileNotFoundError('cannot find the Hydra configs: reinstall conformer-zoo '
                            '(pip install conformer-zoo) or run from a source checkout')


def _train(cfg: DictConfig) -> float:
    from .trainer import train
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = train(cfg, run_dir)
    if launched_rank() != 0:  # one summary per run, from the rank that wrote it
        return result.get('top1', float('nan'))
    if 'top1' not in result:
        print(f'run {result["status"]} at step {result["step"]} | checkpoint {result["checkpoint"]}')
        return float('nan')
    which = 'EMA' if 'ema_top1' in result else 'model'
    top1 = result['ema_top1'] if which == 'EMA' else result['top1']
    print(f'test top-1 {top1:.2f}% ({which}; model {result["top1"]:.2f}%, CNN head '
          f'{result["top1_conv"]:.2f}%, transformer head {result["top1_trans"]:.2f}%) | '
          f'checkpoint {result["checkpoint"]} | {run_dir / "metrics.json"} | '
          f'{run_dir / "curves.png"}')
    return top1  # Hydra sweepers (e.g. Optuna) optimise the returned value


def _eval(cfg: DictConfig) -> float:
    from .evaluator import evaluate_checkpoint
    result = evaluate_checkpoint(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / 'eval.json').write_text(json.dumps(result, indent=2) + '\n')
    print(f'top-1 {result["top1"]:.2f}% (CNN head {result["top1_conv"]:.2f}%, transformer head '
          f'{result["top1_trans"]:.2f}%) on {result["count"]} images | {run_dir / "eval.json"}')
    return result['top1']


def train_cli() -> None:
    hydra.main(config_path=config_dir(), config_name='train', version_base='1.3')(_train)()


def eval_cli() -> None:
    hydra.main(config_path=config_dir(), config_name='eval', version_base='1.3')(_eval)()

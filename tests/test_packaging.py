"""The wheel holds every subpackage, the kernels and the Hydra configs."""
import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']


def test_every_subpackage_is_listed():
    listed = set(_setuptools()['packages'])
    on_disk = {'.'.join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / 'conformer').rglob('__init__.py')}
    assert on_disk <= listed, f'add {sorted(on_disk - listed)} to [tool.setuptools] packages'
    assert {'conformer.kernels', 'conformer.configs'} <= listed


def test_mapped_packages_import_from_the_top_level_folders():
    dirs = _setuptools()['package-dir']
    assert dirs['conformer.kernels'] == 'kernels' and dirs['conformer.configs'] == 'configs'
    kernels = importlib.import_module('conformer.kernels')
    assert Path(kernels.__file__).parent.name in ('kernels',)
    configs = importlib.import_module('conformer.configs')
    assert (Path(configs.__file__).parent / 'train.yaml').is_file()


def test_every_config_is_package_data():
    patterns = _setuptools()['package-data']['conformer.configs']
    configs = ROOT / 'configs'
    shipped = {p for pattern in patterns for p in configs.glob(pattern)}
    assert set(configs.rglob('*.yaml')) == shipped


def test_console_scripts_resolve():
    scripts = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']
    for name, target in scripts.items():
        module, func = target.split(':')
        assert callable(getattr(importlib.import_module(module), func)), name

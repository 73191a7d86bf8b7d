"""The wheel holds every subpackage, the kernels and the Hydra configs, and declares every
package the library imports."""
import ast
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib

from helpers import REPO


def _setuptools() -> dict:
    return tomllib.loads((REPO / 'pyproject.toml').read_text())['tool']['setuptools']


def test_every_subpackage_is_listed():
    listed = set(_setuptools()['packages'])
    on_disk = {'.'.join(p.parent.relative_to(REPO).parts)
               for p in (REPO / 'conformer').rglob('__init__.py')}
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
    configs = REPO / 'configs'
    shipped = {p for pattern in patterns for p in configs.glob(pattern)}
    assert set(configs.rglob('*.yaml')) == shipped


def test_console_scripts_resolve():
    scripts = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['scripts']
    for name, target in scripts.items():
        module, func = target.split(':')
        assert callable(getattr(importlib.import_module(module), func)), name


def _distribution(requirement: str) -> str:
    return re.sub(r'[-_.]+', '-', re.match(r'[A-Za-z0-9_.\-]+', requirement)[0]).lower()


def test_every_imported_package_is_declared():
    project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
    declared = {_distribution(r) for r in project['dependencies']}
    declared |= {_distribution(r) for extra in project['optional-dependencies'].values()
                 for r in extra}
    imported = set()
    for path in [*(REPO / 'conformer').rglob('*.py'), *(REPO / 'kernels').rglob('*.py')]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split('.')[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split('.')[0])
    providers = importlib.metadata.packages_distributions()
    undeclared = {module: providers.get(module)
                  for module in imported - set(sys.stdlib_module_names) - {'conformer'}
                  if not declared & {_distribution(d) for d in providers.get(module, [])}}
    assert not undeclared, f'imported but not in pyproject.toml dependencies: {undeclared}'

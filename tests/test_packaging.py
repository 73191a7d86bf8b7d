"""The wheel holds every subpackage, the kernels and the Hydra configs, declares every
package the library imports, and no module imports from a layer above its own."""
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
    # an optional package that is not installed is known by its import name
    providers = importlib.metadata.packages_distributions()
    undeclared = {module: providers.get(module)
                  for module in imported - set(sys.stdlib_module_names) - {'conformer'}
                  if not declared & {_distribution(d) for d in providers.get(module, [module])}}
    assert not undeclared, f'imported but not in pyproject.toml dependencies: {undeclared}'


# The library's layers, lowest first: a module may import from lower layers and its own part.
LAYERS = [
    {'runtime'},  # process-wide settings and the launcher's variables, read by every part
    {'kernels', 'data'},
    {'layers'},
    {'models'},
    {'weights'},  # also `import conformer`, which registers the models and the weight loader
    {'engine', 'deploy', 'export', 'viz', 'predict'},
    {'benchmark'},
    {'cli'},
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str:
    """'conformer.weights.reader' -> 'weights'; 'kernels.fcu' -> 'kernels'; 'conformer' -> ''."""
    names = module.split('.')
    return 'kernels' if names[0] == 'kernels' else (names[1] if len(names) > 1 else '')


def _imported_modules(path: Path, module: str):
    """Every conformer/kernels module `path` imports, relative imports resolved."""
    package = module if path.name == '__init__.py' else module.rpartition('.')[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parent = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(parent + ([node.module] if node.module else []))
            # `from conformer import runtime` imports the submodule conformer.runtime
            yield from ((f'{base}.{alias.name}' if base in ('conformer', 'conformer.kernels')
                         else base) for alias in node.names)


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path in sorted([*(REPO / 'conformer').rglob('*.py'), *(REPO / 'kernels').rglob('*.py')]):
        relative = path.relative_to(REPO).with_suffix('')
        module = '.'.join(relative.parts[:-1] if relative.name == '__init__' else relative.parts)
        if module == 'conformer':
            continue  # the package root imports what `import conformer` provides
        importer = _part(module)
        assert importer in RANK, f'{module}: add its part {importer!r} to LAYERS'
        for imported in _imported_modules(path, module):
            if not imported.startswith(('conformer', 'kernels')):
                continue
            part = _part(imported)
            # `import conformer` runs the root, which imports models and weights
            rank = RANK['weights'] if part == '' else RANK.get(part)
            if part != importer and (rank is None or rank >= RANK[importer]):
                upward.append(f'{module} imports {imported}')
    assert not upward, 'imports from a layer above (see LAYERS):\n' + '\n'.join(upward)

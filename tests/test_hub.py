"""torch.hub from a plain source checkout, as `torch.hub.load('<owner>/conformer-zoo', ...)`
downloads it: nothing installed, kernels/ and configs/ at the repository's top level."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from helpers import REPO

CHECKOUT = ('conformer', 'kernels', 'configs', 'hubconf.py', 'pyproject.toml')

HUB_LOAD = """
import importlib.util, sys
import torch
assert importlib.util.find_spec('conformer') is None, 'conformer is importable without hub'
model = torch.hub.load(sys.argv[1], 'conformer_tiny_patch16', source='local', depth=6,
                       embed_dim=32, num_heads=2, base_channel=8, num_classes=3)
import conformer.configs, conformer.kernels
print(conformer.kernels.__file__, conformer.configs.__file__)
with torch.no_grad():
    print(tuple(model.eval()(torch.randn(2, 3, 64, 48)).shape))
"""


def _dependencies_without_the_project(folder: Path) -> Path:
    """A copy of site-packages (as links) holding every dependency but no installed conformer:
    neither the package, its metadata nor the editable install's path hook."""
    folder.mkdir()
    for site in {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}:
        for entry in Path(site).iterdir():
            if not entry.name.startswith(('conformer', '__editable__')):
                (folder / entry.name).symlink_to(entry)
    return folder


def test_torch_hub_loads_every_subpackage_from_a_source_checkout(tmp_path):
    repo = tmp_path / 'conformer-zoo'
    for name in CHECKOUT:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copy2(source, repo / name)
    site = _dependencies_without_the_project(tmp_path / 'site-packages')
    # -S: no site-packages and no .pth files, so only the links above are importable
    result = subprocess.run([sys.executable, '-S', '-c', HUB_LOAD, str(repo)], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    files, shape = result.stdout.strip().splitlines()[-2:]
    kernels, configs = files.split()
    assert Path(kernels) == repo / 'kernels' / '__init__.py'
    assert Path(configs) == repo / 'configs' / '__init__.py'
    assert shape == '(2, 3)'

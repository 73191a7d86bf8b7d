"""Run timm's own model tests on the Conformer variants, the way timm runs a two-stream model.

timm's wheel has no tests, its source distribution does: this fetches the sdist of the installed
timm version, takes its tests/test_models.py and runs it with two adaptations only:

- a conftest beside it imports ``conformer`` (registering the variants) and only tests of
  ``conformer_*`` models are selected (``-k conformer_``);
- ``conformer_*`` joins the file's ``NON_STD_FILTERS``, timm's list of models whose
  ``forward_features`` is not one NCHW map (tuples are compared element-wise there).

``GITHUB_ACTIONS`` is set as in timm's own CI, which leaves out the one test that downloads every
model's pretrained weights. Usage, from anywhere (extra arguments go to pytest)::

    python .ci/timm_model_tests.py [-x] [--durations=10]
"""
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm

NON_STD = 'NON_STD_FILTERS = ['
CONFTEST = 'import conformer  # noqa: F401  (registers the Conformer variants with timm)\n'


def fetch_test_models(version: str, folder: Path) -> str:
    """The text of tests/test_models.py from timm's sdist of ``version``."""
    download = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-binary', ':all:',
                '--no-deps', f'timm=={version}', '-d', str(folder)]
    if subprocess.run(download).returncode:
        sys.exit(f'could not download the source distribution of timm {version} '
                 f'(`{" ".join(download[2:])}`); the package index must be reachable')
    (sdist,) = folder.glob('timm-*.tar.gz')
    with tarfile.open(sdist) as archive:
        return archive.extractfile(f'{sdist.name[:-len(".tar.gz")]}/tests/test_models.py').read(
        ).decode()


def main(pytest_args: list) -> int:
    with tempfile.TemporaryDirectory(prefix='timm-tests-') as tmp:
        folder = Path(tmp)
        source = fetch_test_models(timm.__version__, folder)
        if source.count(NON_STD) != 1:
            sys.exit(f"timm {timm.__version__}'s tests/test_models.py has no single "
                     f'`{NON_STD}...]`; this runner needs updating for it')
        (folder / 'test_models.py').write_text(source.replace(NON_STD, NON_STD + "'conformer_*', "))
        (folder / 'conftest.py').write_text(CONFTEST)
        command = [sys.executable, '-m', 'pytest', str(folder / 'test_models.py'), '-k',
                   'conformer_', '--rootdir', tmp, '-p', 'no:cacheprovider', '-q',
                   '-W', 'ignore::pytest.PytestUnknownMarkWarning', *pytest_args]
        return subprocess.run(command, env=dict(os.environ, GITHUB_ACTIONS='true')).returncode


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))

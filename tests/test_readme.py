"""README.md cannot drift from the code: every ```bash and ```python block in it runs here.

The blocks run in README order in one scratch folder, as a reader following the README
would: later blocks use the run folders and files earlier ones made, so select the whole
file (`-m slow`), not one block. A new block is picked up by itself. To keep the runs short
and offline, the commands are changed only by appending arguments (Hydra and argparse both
keep the last value of a key):

- training commands get `trainer.max_steps=2`; train and eval commands that name no
  `data.root` get a Fashion-MNIST copy of 100 training and 10 test images per class, and
  those on the README's `my_images` folder (made here: two classes of random images) run
  at 64 px in batches of 16 (the tools that read the checkpoint follow);
- benchmark commands get the nano model at 32 px, one batch size and one round;
- the published weights are random weights of the same variant, served from a loopback
  server (a `sitecustomize` on PYTHONPATH points the variants' URLs at it), and `hf-hub:`
  names are served from the scratch folder under `HF_ENDPOINT`.

The two set-up commands install software, so they are compared with `.ci/run` (which runs
the test command first) instead of run; only the quickstart at the end of the first runs.
A block the test must not run is preceded by `<!-- readme-test: skip REASON -->` and must
be listed in NOT_RUN below.
"""
import gzip
import io
import os
import re
import shlex
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import conformer  # noqa: F401  registers the variants
from conformer.data import fashion_mnist

from helpers import REPO
from helpers.http_server import LoopbackServer

README = REPO / 'README.md'
CI_SCRIPT = REPO / '.ci' / 'run'

# Blocks the test does not run ({first command: reason}); each is marked in the README too.
NOT_RUN = {
    'python3 -m venv .venv && .venv/bin/pip install torch torchvision --index-url '
    'https://download.pytorch.org/whl/cpu': 'downloads torch from download.pytorch.org',
    'hf upload ORG/nano-fmnist nano-fmnist':
        'uploads to the Hugging Face Hub (needs an account and network)',
    'python tools/bench_kernels.py --out bench.json': 'needs a CUDA GPU',
    'python tools/gpu_check.py --out gpu_check.json': 'needs a CUDA GPU',
    'torchrun --standalone --nproc_per_node 8 tools/train.py '
    'experiment=imagenet_conformer_base_patch16 data.root=/data/imagenet':
        'needs 8 GPUs and ImageNet',
    'torchrun --standalone --nproc_per_node 8 tools/train.py '
    'experiment=imagenet_conformer_small_patch16 data.root=/data/imagenet':
        'needs 8 GPUs and ImageNet',
    'torchrun --nproc_per_node=8 tools/train.py experiment=dino_imagenet_conformer_small_patch16 '
    'data.root=/data/imagenet': 'needs 8 GPUs and ImageNet',
}
LANGUAGES = {'bash', 'python', 'text', 'bibtex'}  # text and bibtex blocks are not code
MARKER = re.compile(r'<!--\s*readme-test:\s*(\S+)\s*(.*?)\s*-->')
TRAIN = re.compile(r'(^|\s)(conformer-train|\S*tools/train\.py)\s')
EVAL = re.compile(r'(^|\s)(conformer-eval|conformer-knn|\S*tools/(eval|knn)\.py)\s')
BENCHMARK = re.compile(r'(^|\s)(conformer-benchmark|\S*tools/benchmark\.py)(\s|$)')
SHORT_BENCHMARK = ('--model conformer_nano_patch4 --image-size 32 --batch-sizes 1 --rounds 1 '
                   '--warmup 1')
TIMEOUT_S = 900


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: Optional[str] = None  # 'setup' | 'ci' | 'skip'
    reason: str = ''

    @property
    def first_command(self) -> str:
        """The first line, continuation lines joined, spaces collapsed."""
        return ' '.join(re.sub(r'\\\n', ' ', self.code).strip().splitlines()[0].split())


def readme_blocks(text: str) -> List[Block]:
    """The fenced blocks of a markdown text, each with the readme-test marker above it."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if not lines[i].startswith('```'):
            i += 1
            continue
        start, language = i, lines[i][3:].strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith('```')), None)
        assert end is not None, f'README.md:{start + 1}: a code block is never closed'
        block = Block(start + 1, language, '\n'.join(lines[start + 1:end]) + '\n')
        above = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), '')
        if match := MARKER.fullmatch(above.strip()):
            block.marker, block.reason = match.groups()
        blocks.append(block)
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def commands(script: str) -> List[str]:
    """The commands of a shell script: continuations joined, split at `&&` and newlines,
    without comments, `set` options and the `cd` to the repository root."""
    joined = re.sub(r'\\\n\s*', ' ', script)
    steps = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith('#') or line.startswith('set ') or line.startswith('cd '):
            continue
        steps += [' '.join(shlex.split(step)) for step in line.split(' && ')]
    return steps


def marked(marker: str) -> Block:
    found = [b for b in BLOCKS if b.marker == marker]
    assert len(found) == 1, f'README.md needs exactly one block marked readme-test: {marker}'
    return found[0]


def test_every_block_is_known_code_or_text_and_markers_are_valid():
    for block in BLOCKS:
        assert block.language in LANGUAGES, (
            f'README.md:{block.line}: a ```{block.language} block; use one of {sorted(LANGUAGES)} '
            f'so the test knows whether to run it')
        assert block.marker in (None, 'setup', 'ci', 'skip'), (
            f'README.md:{block.line}: unknown marker readme-test: {block.marker}')
        if block.marker:
            assert block.language == 'bash', f'README.md:{block.line}: markers are for bash'


def test_blocks_not_run_are_listed_with_their_reasons():
    skipped = {b.first_command: b.reason for b in BLOCKS if b.marker == 'skip'}
    assert skipped == NOT_RUN, 'a block marked readme-test: skip must be listed in NOT_RUN'
    assert all(skipped.values()), 'every skipped block needs a reason after the marker'


def test_the_test_setup_command_is_what_ci_runs_first():
    readme = commands(marked('ci').code)
    assert readme == commands(CI_SCRIPT.read_text())[:len(readme)], (
        "the README's test command must be the first command of .ci/run")


def test_the_quickstart_setup_command_installs_as_ci_does_then_trains():
    ci, setup = commands(marked('ci').code), commands(marked('setup').code)
    install = next(i for i, step in enumerate(ci) if ' install -e ' in step)
    expected = ci[:install] + [ci[install].replace('.[test]', '.')]
    assert setup[:install + 1] == expected
    assert len(setup) == install + 2, 'after installing, the set-up command only trains'
    assert setup[-1].startswith('.venv/bin/python tools/train.py experiment=quickstart')


# ---------------------------------------------------------------------------------------
# Running the blocks


def runnable_code(block: Block) -> str:
    """What the test runs of a block: the quickstart's set-up command only trains."""
    if block.marker == 'setup':
        return commands(block.code)[-1] + '\n'
    return block.code


def shortened(command: str, fmnist: Path) -> str:
    """`command` with the arguments appended that make it short and offline."""
    train = TRAIN.search(command + ' ')
    hydra = train or EVAL.search(command + ' ')
    overrides = {}
    if train:
        overrides['trainer.max_steps'] = '2'
    if hydra and 'data.root=' not in command:
        overrides['data.root'] = str(fmnist)
    if hydra and 'data.root=my_images' in command:
        overrides.update({'data.input_size': '64', 'data.batch_size': '16'})
    extra = [f'{key}={value}' for key, value in overrides.items() if f' {key}=' not in command]
    if BENCHMARK.search(command):
        extra.append(SHORT_BENCHMARK)
    return ' '.join([command, *extra])


def bash_script(code: str, fmnist: Path) -> str:
    joined = re.sub(r'\\\n\s*', ' ', code)
    lines = [shortened(line, fmnist) if line.strip() and not line.lstrip().startswith('#')
             else line for line in joined.splitlines()]
    return 'set -euo pipefail\n' + '\n'.join(lines) + '\n'


class ServedFiles:
    """The loopback server's routes: `/weights/{variant}.{tag}.pth` is a random-weight file
    of that variant (made on first request), `/{org}/{repo}/resolve/main/{file}` is
    `{workspace}/{repo}/{file}` (what `conformer-convert` wrote)."""

    def __init__(self, workspace: Path):
        self.workspace, self.weights, self.lock = workspace, {}, threading.Lock()

    def get(self, path: str) -> Optional[bytes]:
        if match := re.fullmatch(r'/weights/([\w.]+)\.pth', path):
            with self.lock:
                if match.group(1) not in self.weights:
                    self.weights[match.group(1)] = random_weights(match.group(1))
                return self.weights[match.group(1)]
        if match := re.fullmatch(r'/[^/]+/([^/]+)/resolve/main/([^/]+)', path):
            file = self.workspace / match.group(1) / match.group(2)
            return file.read_bytes() if file.is_file() else None
        return None


def random_weights(name: str) -> bytes:
    torch.manual_seed(0)
    model = timm.create_model(timm.models.split_model_name_tag(name)[0])
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


SITECUSTOMIZE = '''\
"""The README test's interpreter start-up: published weights come from its loopback server."""
import os

from timm.models import _registry

import conformer  # noqa: F401  (registers the variants and their weights)

for _name, _cfg in _registry._model_pretrained_cfgs.items():
    if _name.startswith('conformer_') and _cfg.url:
        _cfg.url = f"{os.environ['README_TEST_WEIGHTS']}/{_name}.pth"
'''


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def small_fashion_mnist(folder: Path, per_class: dict) -> Path:
    """The first `per_class[split]` images of each class of the real Fashion-MNIST."""
    if not fashion_mnist.DEBIAN_DIR.is_dir():
        pytest.fail(f'Fashion-MNIST is not installed in {fashion_mnist.DEBIAN_DIR}: run '
                    f'`apt-get install dataset-fashion-mnist` (the README set-up does)')
    folder.mkdir()
    for split, (images_stem, labels_stem) in fashion_mnist.FILES.items():
        images = fashion_mnist.read_idx(fashion_mnist.DEBIAN_DIR / f'{images_stem}.gz')
        labels = fashion_mnist.read_idx(fashion_mnist.DEBIAN_DIR / f'{labels_stem}.gz')
        keep = np.sort(np.concatenate(
            [np.flatnonzero(labels == c)[:per_class[split]] for c in range(10)]))
        write_idx(folder / f'{images_stem}.gz', images[keep])
        write_idx(folder / f'{labels_stem}.gz', labels[keep])
    return folder


def my_images(folder: Path, grey: bool = False) -> None:
    """The README's `my_images` layout: two classes, 16 training and 4 val images each (grey
    ones: a dark and a light class, as scans of digits or parts would be)."""
    rng = np.random.default_rng(0)
    for split, count in (('train', 16), ('val', 4)):
        for tint, label in enumerate(('cat', 'dog')):
            class_folder = folder / split / label
            class_folder.mkdir(parents=True)
            for i in range(1, count + 1):
                if grey:
                    pixels = rng.integers(0, 128, (48, 48)) + 100 * tint
                else:
                    pixels = rng.integers(0, 128, (48, 48, 3)) + 100 * np.eye(3)[tint]
                Image.fromarray(pixels.astype(np.uint8)).save(class_folder / f'{i:03}.jpg')


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """A scratch folder laid out like a clone after set-up, and the environment to run in."""
    yield from make_workspace(tmp_path_factory, grey=False)


@pytest.fixture(scope='module')
def grey_workspace(tmp_path_factory):
    """The same, with grey images in `my_images`."""
    yield from make_workspace(tmp_path_factory, grey=True)


def make_workspace(tmp_path_factory, grey: bool):
    ws = tmp_path_factory.mktemp('readme')
    (ws / '.venv').symlink_to(Path(sys.prefix))  # the venv the set-up command makes
    (ws / 'tools').symlink_to(REPO / 'tools')
    fmnist = small_fashion_mnist(ws.parent / f'{ws.name}-fmnist', {'train': 100, 'test': 10})
    my_images(ws / 'my_images', grey)
    shim = ws.parent / f'{ws.name}-site'
    shim.mkdir()
    (shim / 'sitecustomize.py').write_text(SITECUSTOMIZE)
    server = LoopbackServer(timeout=None)  # the blocks take longer than 300 s; closed below
    server.routes = ServedFiles(ws)
    env = dict(os.environ, PATH=f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}',
               PYTHONPATH=str(shim), README_TEST_WEIGHTS=f'{server.url}/weights',
               HF_ENDPOINT=server.url, HF_HOME=str(ws / '.hf'), HF_HUB_DISABLE_XET='1',
               TORCH_HOME=str(ws / '.torch'), MPLBACKEND='Agg', PYTHONUNBUFFERED='1')
    env.pop('HF_HUB_OFFLINE', None)
    yield ws, env, fmnist
    server.close()


RUNNABLE = [b for b in BLOCKS if b.language in ('bash', 'python') and b.marker in (None, 'setup')]


@pytest.mark.slow
@pytest.mark.parametrize('block', RUNNABLE, ids=[f'L{b.line}-{b.language}' for b in RUNNABLE])
def test_readme_block_runs(block, workspace):
    ws, env, fmnist = workspace
    code = runnable_code(block)
    if block.language == 'python':
        script = ws / f'readme_block_{block.line}.py'
        script.write_text(code)
        argv = [sys.executable, script.name]
    else:
        argv = ['bash', '-c', bash_script(code, fmnist)]
    result = subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 0, (
        f'README.md:{block.line} failed (exit {result.returncode}):\n{" ".join(argv[-1:])}\n'
        f'--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}')
    if block.first_command == 'conformer-model-table':  # the README's table is what it prints
        printed = set(result.stdout.splitlines())
        table = [line for line in README.read_text().splitlines()
                 if line.startswith('| conformer_') and line.count('|') == 6]
        assert table and not set(table) - printed, (
            f'README.md: the models table differs from what conformer-model-table prints:\n'
            f'{result.stdout}')


def own_images_recipes() -> List[Block]:
    """The training commands of the README's "Train on your own images" section."""
    text = README.read_text()
    start = text.index('## Train on your own images')
    end = text.index('\n## ', start + 1)
    first, last = text[:start].count('\n') + 1, text[:end].count('\n') + 1
    return [b for b in BLOCKS if first <= b.line <= last and b.language == 'bash'
            and TRAIN.search(b.code + ' ')]


@pytest.mark.slow
def test_the_own_images_recipes_run_as_written_on_grey_images(grey_workspace):
    """From scratch on the CPU, from the hosted weights, and from the quickstart's
    checkpoint (made first, as the set-up command does), shortened as every block is."""
    ws, env, fmnist = grey_workspace
    recipes = own_images_recipes()
    assert len(recipes) == 3, [b.code for b in recipes]
    blocks = [runnable_code(marked('setup')), *(b.code for b in recipes)]
    for code in blocks:
        result = subprocess.run(['bash', '-c', bash_script(code, fmnist)], cwd=ws, env=env,
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        assert result.returncode == 0, f'{code}\n--- stderr\n{result.stderr[-4000:]}'
        assert 'val top-1' in result.stdout or 'experiment=quickstart' in code
    runs = {path.parent.parent.name: torch.load(path, map_location='cpu', weights_only=True)
            for path in (ws / 'runs').glob('*/checkpoints/last.pth')}
    assert set(runs) == {'quickstart', 'my_images', 'my_images_cpu',
                         'my_images_from_quickstart'}
    for name in ('my_images', 'my_images_cpu', 'my_images_from_quickstart'):
        assert runs[name]['meta']['classes'] == ['cat', 'dog'] and runs[name]['step'] == 2
    cpu = runs['my_images_cpu']['meta']
    assert (cpu['variant'], cpu['in_chans'], cpu['mean']) == ('conformer_nano_patch4', 1,
                                                              [0.449])
    # the quickstart's architecture, channels and normalisation came with its checkpoint
    mine, quick = runs['my_images_from_quickstart']['meta'], runs['quickstart']['meta']
    for key in ('variant', 'model_kwargs', 'in_chans', 'mean', 'std'):
        assert mine[key] == quick[key], key

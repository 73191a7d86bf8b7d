"""The listing index: built once (headers checked in worker processes), loaded by later runs
and ranks without opening a file, rebuilt when the tree changed (saying what changed), kept in
the cache when the folder is read-only; unlabelled folders at any depth."""
import logging
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conformer.data import ImageFolder, build_datasets, index
from conformer.data import images as images_module
from conformer.engine.config import DataConfig


def tree(root, layout):
    """layout: {relative path: colour}; tiny PNGs."""
    for rel, colour in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (4, 4), colour).save(path)
    return root


LAYOUT = {'cat/a.png': (1, 0, 0), 'cat/b.png': (2, 0, 0), 'dog/x/c.png': (3, 0, 0),
          'dog/d.png': (4, 0, 0)}


def no_header_reads(monkeypatch):
    def refuse(path):
        raise AssertionError(f'opened {path}: the index should have been loaded')
    monkeypatch.setattr(index, 'check_image_header', refuse)


def pixels(ds):
    return [(ds[i][0].getpixel((0, 0))[0], ds[i][1]) for i in range(len(ds))]


def test_the_index_is_written_beside_the_data_and_later_loads_open_no_file(tmp_path, monkeypatch):
    root = tree(tmp_path / 'data', LAYOUT)
    first = ImageFolder(str(root))
    assert (root / '.conformer-index.npz').is_file()
    # sorted by class, then by path within it (sub-folders of a class count as the class)
    assert pixels(first) == [(1, 0), (2, 0), (4, 1), (3, 1)] and first.classes == ['cat', 'dog']
    no_header_reads(monkeypatch)
    again = ImageFolder(str(root))
    assert pixels(again) == pixels(first) and again.samples == first.samples
    assert again.targets.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize('change, says', [
    (lambda root: tree(root, {'dog/e.png': (9, 0, 0)}), 'added, removed or renamed in'),
    (lambda root: (root / 'cat' / 'a.png').unlink(), 'added, removed or renamed in'),
    (lambda root: tree(root, {'bird/z.png': (7, 0, 0)}), 'entries of'),
    (lambda root: shutil.rmtree(root / 'dog' / 'x'), 'removed'),
    # edited in place (its folder's mtime stays): the sampled file stats catch it
    (lambda root: tree(root, {'cat/b.png': (8, 0, 0)}), 'cat/b.png was changed'),
])
def test_a_stale_index_is_rebuilt_and_the_warning_says_what_changed(tmp_path, caplog, change,
                                                                    says):
    root = tree(tmp_path / 'data', LAYOUT)
    ImageFolder(str(root))
    time.sleep(0.01)  # a new mtime on file systems with coarse clocks
    change(root)
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(str(root))
    assert 'rebuilding the stale index' in caplog.text and says in caplog.text, caplog.text
    listing = index.list_tree(root.resolve(), True, 1)  # what a listing from scratch gives
    assert ds.listing.names() == listing.names() and ds.classes == listing.classes


def test_an_index_copied_with_another_tree_is_not_used(tmp_path, caplog):
    a = tree(tmp_path / 'a', LAYOUT)
    b = tree(tmp_path / 'b', {'cat/only.png': (5, 0, 0), 'dog/one.png': (6, 0, 0)})
    ImageFolder(str(a))
    shutil.copy(a / '.conformer-index.npz', b / '.conformer-index.npz')
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(str(b))
    assert f'it lists {a.resolve()}, not {b.resolve()}' in caplog.text
    assert pixels(ds) == [(5, 0), (6, 1)]


def test_a_read_only_folder_keeps_its_index_in_the_cache(tmp_path, monkeypatch):
    root = tree(tmp_path / 'data', LAYOUT)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    # root may write anywhere: make the folder read-only to the index code
    monkeypatch.setattr(index, '_writable', lambda folder: False)
    ImageFolder(str(root))
    assert not (root / '.conformer-index.npz').exists()
    cached = list((tmp_path / 'cache' / 'conformer' / 'index').iterdir())
    assert len(cached) == 1 and cached[0].name.startswith('data-')
    no_header_reads(monkeypatch)
    assert len(ImageFolder(str(root))) == 4


def test_unreadable_files_are_named_again_when_the_index_is_loaded(tmp_path, caplog,
                                                                   monkeypatch):
    root = tree(tmp_path / 'data', LAYOUT)
    (root / 'cat' / 'broken.jpg').write_bytes(b'no image')
    ImageFolder(str(root))
    no_header_reads(monkeypatch)
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(str(root))
    assert len(ds) == 4 and 'broken.jpg' in caplog.text and 'skipping 1 unreadable' in caplog.text
    with pytest.raises(ValueError, match='broken.jpg.*data.strict=false'):
        ImageFolder(str(root), strict=True)


def test_headers_are_checked_in_worker_processes_with_the_same_result(tmp_path):
    layout = {f'c{i % 3}/{i:04d}.png': (i % 256, 0, 0) for i in range(300)}
    root = tree(tmp_path / 'data', layout)
    (root / 'c1' / 'bad.png').write_bytes(b'\x89PNG broken')
    one = index.list_tree(root.resolve(), True, workers=1)
    two = index.list_tree(root.resolve(), True, workers=2)
    assert len(one) == 300 and one.names() == two.names() and one.unreadable == two.unreadable
    assert np.array_equal(one.labels, two.labels) and 'bad.png' in two.unreadable[0]


def test_other_ranks_wait_for_the_first_to_build_the_index(tmp_path):
    root = tree(tmp_path / 'data', LAYOUT)
    waiter = subprocess.Popen(
        [sys.executable, '-c', 'import sys; from conformer.data import ImageFolder, index\n'
         'index.check_image_header = None  # a waiting rank never opens an image\n'
         'print(len(ImageFolder(sys.argv[1])))', str(root)],
        env=dict(os.environ, RANK='1', LOCAL_RANK='1', WORLD_SIZE='2'),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(4)  # long enough to import and start waiting
    assert waiter.poll() is None, waiter.communicate()[0]
    assert not (root / '.conformer-index.npz').exists()
    ImageFolder(str(root))  # rank 0
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out.strip().endswith('4'), out


def test_a_waiting_rank_gives_up_naming_the_command_that_builds_the_index(tmp_path,
                                                                          monkeypatch):
    root = tree(tmp_path / 'data', LAYOUT)
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('RANK', '1')
    with pytest.raises(TimeoutError, match=f'conformer-shards index {root.resolve()}'):
        index.load_or_build(root, '', 'folder', lambda: None,
                            lambda listing: None, wait_timeout=1.0)


def test_an_unlabelled_folder_lists_every_image_at_any_depth(tmp_path):
    root = tree(tmp_path / 'data', {'a.png': (1, 0, 0), 'x/y/b.png': (2, 0, 0),
                                    'x/c.png': (3, 0, 0)})
    ds = ImageFolder(str(root), labelled=False)
    assert ds.classes == [] and ds.targets.tolist() == [-1, -1, -1]
    assert pixels(ds) == [(1, -1), (3, -1), (2, -1)]
    flat = tree(tmp_path / 'flat', {'a.png': (1, 0, 0)})
    with pytest.raises(FileNotFoundError, match='data.labelled=false'):
        ImageFolder(str(flat))  # no class folders: the labelled listing names the fix
    # both listings of one folder have their own index
    labelled = tree(tmp_path / 'l', LAYOUT)
    assert len(ImageFolder(str(labelled), labelled=False)) == 4
    assert ImageFolder(str(labelled)).classes == ['cat', 'dog']
    assert sorted(p.name for p in labelled.glob('.conformer-index*')) == [
        '.conformer-index-unlabelled.npz', '.conformer-index.npz']


def test_unlabelled_training_data_through_the_config(tmp_path):
    tree(tmp_path / 'train', {'p/q/a.png': (1, 0, 0), 'b.png': (2, 0, 0)})
    tree(tmp_path / 'val', LAYOUT)
    cfg = DataConfig(root=str(tmp_path), labelled=False)
    train, evaluation, classes = build_datasets(cfg)
    assert classes == [] and len(train) == 2 and train[0][1] == -1
    assert evaluation.classes == ['cat', 'dog'] and evaluation.exact_count
    shutil.rmtree(tmp_path / 'val')
    train, evaluation, _ = build_datasets(cfg)
    assert evaluation is None and len(train) == 2


def test_a_decode_failure_in_an_unlabelled_folder_gets_a_stand_in(tmp_path, caplog):
    root = tree(tmp_path / 'data', {'a.png': (1, 0, 0), 'b.png': (2, 0, 0)})
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))
    img.save(root / 'c.png')
    (root / 'c.png').write_bytes((root / 'c.png').read_bytes()[:200])
    ds = ImageFolder(str(root), labelled=False)
    with caplog.at_level(logging.WARNING):
        img, target = ds[2]
    assert target == -1 and img.getpixel((0, 0))[0] == 1 and 'c.png' in caplog.text
    assert images_module.read_image(root / 'a.png', 3).size == (4, 4)


def test_label_subsets_of_unlabelled_data_are_refused_before_work():
    from hydra import compose, initialize_config_dir

    from conformer.engine.cli import config_dir
    from conformer.engine.config import check
    with initialize_config_dir(config_dir(), version_base='1.3'):
        cfg = compose('train', overrides=['data.root=/data', 'data.labelled=false',
                                          'data.samples_per_class=5'])
    with pytest.raises(ValueError, match='data.labelled=false trains without labels'):
        check(cfg, world_size=1)

"""Tar shards: the writer's output reads back as the folder it came from (same images, labels and
order), timm's own wds/ reader reads it, training on it equals training on the folder, and
damaged or inconsistent shards are named."""
import hashlib
import json
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from conformer.cli.shards import main as shards_main
from conformer.data import (
    GlobalBatchSampler,
    ImageFolder,
    ShardDataset,
    ShardSampler,
    build_datasets,
    write_shards,
)
from conformer.engine.config import DataConfig

from helpers.image_folders import make_folder


def digest(img):
    return hashlib.sha1(np.asarray(img).tobytes()).hexdigest()


@pytest.fixture(scope='module')
def written(tmp_path_factory):
    """A tiny folder (36 train / 18 val, 3 classes) and its shards, 5 samples per shard."""
    base = tmp_path_factory.mktemp('shards')
    folder = make_folder(base / 'images')
    assert shards_main(['write', str(folder), str(base / 'shards'),
                        '--samples-per-shard', '5']) == 0
    return folder, base / 'shards'


def test_shards_read_back_as_the_folder_they_came_from(written):
    folder, shards = written
    info = json.loads((shards / '_info.json').read_text())
    assert info['splits']['train']['num_samples'] == 36
    assert info['splits']['train']['shard_lengths'] == [5] * 7 + [1]
    assert info['classes'] == ['class0', 'class1', 'class2']
    for split in ('train', 'val'):
        source, read = ImageFolder(str(folder / split)), ShardDataset(str(shards), split)
        assert len(read) == len(source) and read.classes == source.classes
        assert read.targets.tolist() == source.targets.tolist()
        for i in range(len(read)):
            assert digest(read[i][0]) == digest(source[i][0]) and read[i][1] == source[i][1]
    # the shards hold the samples shuffled (streaming readers see mixed classes)
    with tarfile.open(shards / 'shards-train-000000.tar') as tar:
        labels = [int(tar.extractfile(m).read()) for m in tar if m.name.endswith('.cls')]
    assert len(set(labels)) > 1


def test_timms_wds_reader_reads_the_written_shards(written):
    import webdataset  # noqa: F401  (timm's reader needs it; the test extra installs it)
    from timm.data import create_dataset

    folder, shards = written
    source = ImageFolder(str(folder / 'train'))
    expected = sorted((digest(source[i][0]), source[i][1]) for i in range(len(source)))
    timm_set = create_dataset('wds/tiny', root=str(shards), split='train', is_training=False)
    assert len(timm_set) == 36
    seen = sorted((digest(img.convert('RGB')), int(target)) for img, target in timm_set)
    assert seen == expected


def test_shards_train_and_resume_exactly_like_their_folder(written, tmp_path):
    """Same images in the same order with the same augmentation seeds: the same weights, also
    after a stop and a resume mid-epoch."""
    import torch
    from hydra import compose, initialize_config_dir

    from conformer.engine.cli import config_dir
    from conformer.engine.trainer import train

    folder, shards = written
    tiny = ['model=conformer_nano_patch4', 'model.base_channel=8', 'model.embed_dim=16',
            'model.num_heads=2', 'model.depth=6', 'data.input_size=16', 'data.batch_size=12',
            'data.eval_batch_size=9', 'data.num_workers=0', 'aug=small', 'trainer.epochs=2',
            'trainer.threads=1', 'trainer.deterministic=true', 'logging.progress=false',
            'aug.repeated_aug=3']
    on_shards = ['data=shards', f'data.root={shards}', 'data.input_size=16',
                 'data.batch_size=12', 'data.eval_batch_size=9', 'data.num_workers=0']
    # the folder, the shards, and the shards stopped mid-epoch at step 2 then resumed
    runs = (('folder', [f'data.root={folder}']), ('shards', on_shards),
            ('resumed', [*on_shards, 'trainer.max_steps=2']),
            ('resumed', [*on_shards, 'trainer.resume=auto']))
    results = {}
    for name, data in runs:
        with initialize_config_dir(config_dir(), version_base='1.3'):
            cfg = compose('train', overrides=[*tiny, *data])
        results[name] = train(cfg, tmp_path / name)
        assert results[name]['status'] == 'finished'
    assert results['folder']['top1'] == results['shards']['top1'] == results['resumed']['top1']
    a, b, c = (torch.load(tmp_path / n / 'checkpoints' / 'last.pth', weights_only=True)['model']
               for n in ('folder', 'shards', 'resumed'))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    summary = json.loads((tmp_path / 'shards' / 'metrics.json').read_text())
    assert summary['count'] == 18  # every eval image once


def copy_shards(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        if not p.name.startswith('.'):
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_damaged_and_inconsistent_shards_are_named(written, tmp_path):
    _, shards = written
    cases = {}

    cut = copy_shards(shards, tmp_path / 'cut')
    third = cut / 'shards-train-000003.tar'
    third.write_bytes(third.read_bytes()[:1500])
    cases['cut'] = (ValueError, f'shard {third}: ')

    garbage = copy_shards(shards, tmp_path / 'garbage')
    (garbage / 'shards-train-000002.tar').write_bytes(b'\x00garbage' * 300)
    cases['garbage'] = (ValueError, 'shards-train-000002.tar: not a readable tar file')

    missing = copy_shards(shards, tmp_path / 'missing')
    (missing / 'shards-train-000004.tar').unlink()
    cases['missing'] = (FileNotFoundError, 'shard .*shards-train-000004.tar is missing')

    lengths = copy_shards(shards, tmp_path / 'lengths')
    info = json.loads((lengths / '_info.json').read_text())
    info['splits']['train']['shard_lengths'][1] = 6
    (lengths / '_info.json').write_text(json.dumps(info))
    cases['lengths'] = (ValueError, 'shards-train-000001.tar holds 5 samples, .* says 6')

    labels = copy_shards(shards, tmp_path / 'labels')
    info = json.loads((labels / '_info.json').read_text())
    info['classes'] = ['class0', 'class1']  # one class fewer than the labels use
    (labels / '_info.json').write_text(json.dumps(info))
    cases['labels'] = (ValueError, 'has label 2, outside the 2 classes')

    none = tmp_path / 'none'
    none.mkdir()
    cases['none'] = (FileNotFoundError, 'has no _info.json.*conformer-shards write')

    for name, (error, message) in cases.items():
        with pytest.raises(error, match=message):
            ShardDataset(str(tmp_path / name), 'train')
    with pytest.raises(ValueError, match=r"no split 'validation' \(it has \['train', 'val'\]\)"):
        ShardDataset(str(shards), 'validation')


def test_a_shard_index_follows_a_rewritten_shard(written, tmp_path, caplog):
    folder, shards = written
    copy = copy_shards(shards, tmp_path / 'copy')
    assert len(ShardDataset(str(copy), 'val')) == 18
    write_shards(ImageFolder(str(folder / 'val')), copy, 'val', samples_per_shard=4)
    with caplog.at_level(logging.WARNING):
        again = ShardDataset(str(copy), 'val')
    assert 'rebuilding the stale index' in caplog.text and len(again) == 18


def test_an_image_that_does_not_decode_is_named_by_shard_and_key(tmp_path, caplog):
    folder = make_folder(tmp_path / 'images', per_class=4)
    broken = folder / 'train' / 'class1' / '0.png'
    broken.write_bytes(broken.read_bytes()[:120])  # the header reads, the pixels do not
    write_shards(ImageFolder(str(folder / 'train')), tmp_path / 'out', 'train', 5)
    train = ShardDataset(str(tmp_path / 'out'), 'train')
    index = train.listing.names().index('00000004')  # class1's first image in folder order
    with caplog.at_level(logging.WARNING):
        img, label = train[index]
    assert label == 1 and 'another image of its class stands in' in caplog.text
    assert '.tar:00000004' in caplog.text
    evaluation = ShardDataset(str(tmp_path / 'out'), 'train', exact_count=True)
    with pytest.raises(ValueError, match=r'\.tar:00000004.*a stand-in would change the score'):
        evaluation[index]


@pytest.mark.parametrize('world_size', [2, 3, 4])
def test_uneven_shards_give_every_rank_the_same_steps_and_eval_counts_each_sample_once(
        written, world_size):
    _, shards = written
    evaluation = ShardDataset(str(shards), 'val')  # shards of 5, 5, 5 and 3 samples
    seen = sorted(i for rank in range(world_size)
                  for i in ShardSampler(len(evaluation), rank, world_size))
    assert seen == list(range(18))
    train = ShardDataset(str(shards), 'train')
    steps = {len(GlobalBatchSampler(len(train), 12, rank, world_size)) * world_size // 12
             for rank in range(world_size)}
    assert steps == {3}


def test_shards_through_the_config(written):
    _, shards = written
    train, evaluation, classes = build_datasets(
        DataConfig(name='shards', root=str(shards), eval_split='val'))
    assert (len(train), len(evaluation), classes) == (36, 18, ['class0', 'class1', 'class2'])
    assert evaluation.exact_count and not train.exact_count


def test_the_writer_keeps_jpeg_bytes_and_reencodes_other_formats_losslessly(tmp_path):
    rng = np.random.default_rng(0)
    for name in ('a.jpg', 'b.bmp'):
        path = tmp_path / 'src' / 'c' / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(path)
    source = ImageFolder(str(tmp_path / 'src'))
    write_shards(source, tmp_path / 'out', 'train')
    with tarfile.open(tmp_path / 'out' / 'shards-train-000000.tar') as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert members['00000000.jpg'] == (tmp_path / 'src' / 'c' / 'a.jpg').read_bytes()
    assert '00000001.png' in members and members['00000001.cls'] == b'0'
    read = ShardDataset(str(tmp_path / 'out'), 'train')
    assert digest(read[1][0]) == digest(source[1][0])


def test_the_shards_command_names_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        shards_main(['write', str(tmp_path / 'nowhere'), str(tmp_path / 'out')])
    assert exit_.value.code == 2
    assert f'image folder {tmp_path / "nowhere" / "train"} does not exist' in \
        capsys.readouterr().err

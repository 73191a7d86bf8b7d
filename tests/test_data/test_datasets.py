"""Datasets, transforms and samplers: IDX parsing, ImageFolder robustness, sampling invariants."""
import gzip
import logging
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conformer.data import (
    ClassSubset,
    FashionMNIST,
    GlobalBatchSampler,
    ImageFolder,
    SeededTransform,
    fashion_mnist,
    read_idx,
    read_image,
    to_mode,
)
from conformer.data.transforms import build_transform


def write_idx(path, array, compress=True):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(
        f'>{array.ndim}I', *array.shape)
    body = array.astype(array.dtype.newbyteorder('>')).tobytes()
    opener = gzip.open if compress else open
    with opener(path, 'wb') as f:
        f.write(header + body)


def test_read_idx_round_trip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / 'a.gz', images)
    write_idx(tmp_path / 'b', np.array([7, -1, 300], dtype=np.int32), compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / 'a.gz'), images)
    np.testing.assert_array_equal(read_idx(tmp_path / 'b'), [7, -1, 300])


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    write_idx(tmp_path / 'full', np.zeros((4, 5), np.uint8), compress=False)
    (tmp_path / 'cut').write_bytes((tmp_path / 'full').read_bytes()[:-3])
    with pytest.raises(ValueError, match='truncated'):
        read_idx(tmp_path / 'cut')
    (tmp_path / 'png').write_bytes(b'\x89PNG\r\n\x1a\n')
    with pytest.raises(ValueError, match='not an IDX file'):
        read_idx(tmp_path / 'png')
    write_idx(tmp_path / 'full.gz', np.zeros((40, 50), np.uint8))
    (tmp_path / 'cut.gz').write_bytes((tmp_path / 'full.gz').read_bytes()[:-10])
    (tmp_path / 'plain.gz').write_bytes((tmp_path / 'full').read_bytes())  # named .gz, not gzip
    for name in ('cut.gz', 'plain.gz'):
        with pytest.raises(ValueError, match=f'{name} is not a complete gzip file .*'
                                             f'apt-get install --reinstall dataset-fashion-mnist'):
            read_idx(tmp_path / name)


def fake_fashion_root(root, n=6):
    rng = np.random.default_rng(0)
    for split, (img_stem, lbl_stem) in fashion_mnist.FILES.items():
        write_idx(root / f'{img_stem}.gz', rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f'{lbl_stem}.gz', (np.arange(n) % 10).astype(np.uint8))


def test_fashion_mnist_from_a_folder(tmp_path):
    fake_fashion_root(tmp_path)
    ds = FashionMNIST(str(tmp_path), 'test', download=False)
    img, label = ds[3]
    assert len(ds) == 6 and label == 3 and img.mode == 'L' and img.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(img), ds.images[3].numpy())


def test_fashion_mnist_missing_files_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        FashionMNIST(str(tmp_path / 'nowhere'), 'train', download=False)
    fake_fashion_root(tmp_path)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        FashionMNIST(str(tmp_path), 'val', download=False)


def test_fashion_mnist_failed_download_names_the_fix(tmp_path, monkeypatch):
    def offline(root, train, download):
        raise RuntimeError('Error downloading train-images-idx3-ubyte.gz:\nTried http://...')

    monkeypatch.setattr('torchvision.datasets.FashionMNIST', offline)
    with pytest.raises(FileNotFoundError) as error:
        FashionMNIST(str(tmp_path / 'empty'), 'train', download=True)
    assert 'downloading them into' in str(error.value)
    assert '(Error downloading train-images-idx3-ubyte.gz:)' in str(error.value)
    assert 'apt-get install dataset-fashion-mnist' in str(error.value)


@pytest.fixture(scope='module')
def debian_fashion_mnist():
    if not fashion_mnist.DEBIAN_DIR.is_dir():
        pytest.fail(f'Fashion-MNIST is not installed in {fashion_mnist.DEBIAN_DIR}: run '
                    f'`apt-get install -y dataset-fashion-mnist` (the CI script does)')
    return fashion_mnist.DEBIAN_DIR


def test_real_fashion_mnist_matches_its_published_shape(debian_fashion_mnist):
    train, test = FashionMNIST(None, 'train', False), FashionMNIST(None, 'test', False)
    assert (len(train), len(test)) == (60000, 10000)
    # the published splits are exactly balanced: 6000 / 1000 images per class
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    assert abs(train.images.float().mean().item() / 255 - fashion_mnist.MEAN[0]) < 1e-3


def save(path, img, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def test_every_image_mode_becomes_the_model_channels(tmp_path):
    save(tmp_path / 'a' / 'rgb.png', Image.new('RGB', (9, 7), (10, 20, 30)))
    save(tmp_path / 'a' / 'gray.png', Image.new('L', (9, 7), 128))
    save(tmp_path / 'a' / 'cmyk.jpg', Image.new('CMYK', (9, 7), (0, 255, 255, 0)))
    save(tmp_path / 'b' / 'rgba.png', Image.new('RGBA', (9, 7), (255, 0, 0, 0)))
    save(tmp_path / 'b' / 'palette.gif', Image.new('P', (9, 7), 3))
    save(tmp_path / 'b' / 'deep.png', Image.fromarray(np.full((7, 9), 65535, np.uint16)))
    for chans, mode in ((3, 'RGB'), (1, 'L')):
        ds = ImageFolder(str(tmp_path), in_chans=chans)
        assert ds.classes == ['a', 'b'] and len(ds) == 6
        assert all(ds[i][0].mode == mode and ds[i][0].size == (9, 7) for i in range(6))
    rgb = ImageFolder(str(tmp_path), in_chans=3)
    by_name = {p.rsplit('/', 1)[1]: i for i, (p, _) in enumerate(rgb.samples)}
    assert rgb[by_name['cmyk.jpg']][0].getpixel((0, 0))[0] > 200  # cyan-free magenta+yellow = red
    assert rgb[by_name['rgba.png']][0].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    # 16-bit white stays white
    assert rgb[by_name['deep.png']][0].getpixel((0, 0)) == (255, 255, 255)


def test_unreadable_images_are_skipped_by_name_or_fail_in_strict_mode(tmp_path, caplog):
    good = save(tmp_path / 'a' / 'good.png', Image.new('RGB', (8, 8), (1, 2, 3)))
    save(tmp_path / 'b' / 'ok.png', Image.new('RGB', (8, 8), (4, 5, 6)))
    (tmp_path / 'a' / 'bad.jpg').write_bytes(b'not an image at all')
    full = save(tmp_path / 'a' / 'cut.png', Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    full.write_bytes(full.read_bytes()[:200])  # truncated mid-stream: the header still reads
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(str(tmp_path))
    # bad.jpg is not listed at all: the dataset counts only files that open
    assert 'skipping 1 unreadable images' in caplog.text and 'bad.jpg' in caplog.text
    names = [p.rsplit('/', 1)[1] for p, _ in ds.samples]
    assert names == ['cut.png', 'good.png', 'ok.png'] and len(ds) == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        img, label = ds[names.index('cut.png')]
    # in training another image of the same class stands in, and the warning names the file
    assert label == 0 and img.getpixel((0, 0)) == (1, 2, 3)
    assert 'cut.png' in caplog.text and 'another image of its class stands in' in caplog.text
    assert ds[names.index('good.png')][0].getpixel((0, 0)) == (1, 2, 3)
    # in evaluation a stand-in would change the score: the file is named instead
    evaluation = ImageFolder(str(tmp_path), exact_count=True)
    with pytest.raises(ValueError, match='cut.png.*a stand-in would change the score'):
        evaluation[names.index('cut.png')]
    assert evaluation[names.index('good.png')][1] == 0
    with pytest.raises(ValueError, match='bad.jpg.*data.strict=false'):
        ImageFolder(str(tmp_path), strict=True)
    assert good.exists()


def png_header_claiming(path, width, height):
    """A valid PNG of `width` x `height` pixels by its header, with almost no pixel data: what
    a decompression bomb looks like to a reader before it decodes."""
    def chunk(kind, data):
        return (struct.pack('>I', len(data)) + kind + data
                + struct.pack('>I', zlib.crc32(kind + data)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height,
                                                                          8, 0, 0, 0, 0))
                     + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b''))
    return path


def test_a_decompression_bomb_header_is_skipped_by_name(tmp_path, caplog):
    save(tmp_path / 'a' / 'x.png', Image.new('RGB', (4, 4)))
    save(tmp_path / 'b' / 'y.png', Image.new('RGB', (4, 4)))
    bomb = png_header_claiming(tmp_path / 'b' / 'huge.png', 60000, 60000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)  # the file really is one to PIL
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(str(tmp_path))
    assert len(ds) == 2 and [ds[i][1] for i in range(2)] == [0, 1]
    assert 'huge.png' in caplog.text and 'decompression bomb' in caplog.text
    with pytest.raises(ValueError, match='huge.png.*decompression bomb'):
        ImageFolder(str(tmp_path), strict=True)


def test_a_class_folder_without_one_readable_image_is_named(tmp_path):
    save(tmp_path / 'cat' / 'x.png', Image.new('RGB', (4, 4)))
    for name in ('a.jpg', 'b.png'):
        (tmp_path / 'dog' / name).parent.mkdir(exist_ok=True)
        (tmp_path / 'dog' / name).write_bytes(b'\xff\xd8 broken')
    with pytest.raises(ValueError, match=f'class folder {tmp_path / "dog"} holds no readable '
                                         f'image.*all 2 files'):
        ImageFolder(str(tmp_path))
    # every file cut after its header: found when loading, and named then
    for name in ('a.jpg', 'b.png'):
        (tmp_path / 'dog' / name).unlink()
    for i in range(2):
        deep = save(tmp_path / 'dog' / f'{i}.png', Image.fromarray(
            np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
        deep.write_bytes(deep.read_bytes()[:100])
    ds = ImageFolder(str(tmp_path))
    with pytest.raises(ValueError, match=f'class folder {tmp_path / "dog"} holds no readable'):
        ds[1]


def test_exif_orientation_is_applied_everywhere(tmp_path):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to
    view) is read upright, by the dataset and by the reader the tools use."""
    upright = Image.new('RGB', (16, 32), (255, 0, 0))
    upright.paste((0, 0, 255), (0, 16, 16, 32))  # top half red, bottom half blue
    stored = upright.rotate(90, expand=True)  # what the camera wrote: 32 wide, 16 high
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path / 'a' / 'photo.jpg', stored, exif=exif, quality=95)
    for img in (read_image(path, 3), ImageFolder(str(tmp_path))[0][0]):
        assert img.size == (16, 32)
        top, bottom = img.getpixel((8, 4)), img.getpixel((8, 28))
        assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize('mode, values, expected', [
    ('I;16', np.array([[0, 257 * 100, 65535]], np.uint16), [0, 100, 255]),  # 16-bit PNG
    ('I', np.array([[0, 257 * 100, 70000]], np.int32), [0, 100, 255]),  # 32-bit int TIFF
    ('F', np.array([[0.0, 0.5, 1.5]], np.float32), [0, 128, 255]),  # float TIFF, 0..1
])
def test_deep_images_are_scaled_not_clipped_to_black(mode, values, expected, tmp_path):
    image = Image.fromarray(values)
    assert image.mode == mode
    path = save(tmp_path / 'a' / ('deep.png' if mode == 'I;16' else 'deep.tif'), image)
    with Image.open(path) as stored:
        assert stored.mode == mode  # the file holds the deep values
    for in_chans, mode_out in ((1, 'L'), (3, 'RGB')):
        img = read_image(path, in_chans)
        assert img.mode == mode_out
        grey = np.asarray(img.convert('L'))[0].tolist()
        assert grey == expected
    assert np.asarray(ImageFolder(str(tmp_path), in_chans=1)[0][0])[0].tolist() == expected


def test_image_folder_tree_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        ImageFolder(str(tmp_path / 'missing'))
    with pytest.raises(FileNotFoundError, match='no class sub-folders'):
        ImageFolder(str(tmp_path))
    save(tmp_path / 'cat' / 'x.png', Image.new('RGB', (4, 4)))
    (tmp_path / 'dog').mkdir()
    with pytest.raises(FileNotFoundError, match='dog holds no images'):
        ImageFolder(str(tmp_path))


def test_class_subset_relabels_and_limits(tmp_path):
    fake_fashion_root(tmp_path, n=40)
    base = FashionMNIST(str(tmp_path), 'train', download=False)
    sub = ClassSubset(base, [7, 2], per_class=3, seed=1)
    assert len(sub) == 6 and sorted(sub.targets) == [0, 0, 0, 1, 1, 1]
    assert sub.classes == ['Sneaker', 'Pullover']
    for i in range(len(sub)):
        assert base.targets[sub.indices[i]].item() == (7, 2)[sub[i][1]]
    with pytest.raises(ValueError, match='fewer than'):
        ClassSubset(base, [0], per_class=5)
    with pytest.raises(ValueError, match='out of range'):
        ClassSubset(base, [10])


def test_ranks_split_each_global_batch_the_same_way_for_any_world_size():
    single = list(GlobalBatchSampler(50, 12, seed=3))
    assert len(single) == 48 and len({i for i, _ in single}) == 48
    for world in (2, 3, 4):
        shards = [list(GlobalBatchSampler(50, 12, r, world, seed=3)) for r in range(world)]
        merged = [key for step in range(4) for shard in shards
                  for key in shard[step * 12 // world:(step + 1) * 12 // world]]
        assert merged == single  # same images, same augmentation seeds, same steps


def test_sampler_resumes_mid_epoch_and_changes_order_per_epoch():
    s = GlobalBatchSampler(40, 8, seed=0)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_step=3)
    assert list(s) == full[24:] and len(s) == 16
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in full]


def test_repeated_augmentation_repeats_each_image_with_new_seeds():
    keys = list(GlobalBatchSampler(30, 6, seed=0, repeats=3))
    images = [i for i, _ in keys]
    assert len(keys) == 30 and all(images.count(i) == 3 for i in set(images))
    assert len({seed for _, seed in keys}) == 30


def test_sampler_rejects_bad_batch():
    with pytest.raises(ValueError, match='not divisible by the world size'):
        GlobalBatchSampler(100, 10, 0, 3)
    with pytest.raises(ValueError, match='fewer than one global batch'):
        GlobalBatchSampler(5, 8)


def test_seeded_transform_is_reproducible_and_leaves_global_rng_alone():
    data = [(Image.new('L', (4, 4)), 0)]

    def noisy(_):
        return (torch.rand(2), np.random.rand(), random.random())

    view = SeededTransform(data, noisy)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    a = view[(0, 123)][0]
    after = (torch.rand(1), np.random.rand(), random.random())
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    expected_after = (torch.rand(1), np.random.rand(), random.random())
    assert after == expected_after
    b = view[(0, 123)][0]
    c = view[(0, 124)][0]
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert not torch.equal(a[0], c[0])


def test_a_batch_fetch_gives_each_image_its_own_seeded_view():
    """The DataLoader's __getitems__ path: same views as one-by-one fetches, in any batch
    grouping, and the global RNG streams are left where they were."""
    data = [(Image.new('L', (4, 4)), i) for i in range(4)]
    view = SeededTransform(data,
                           lambda _: (torch.rand(1).item(), np.random.rand(), random.random()))
    keys = [(0, 7), (1, 8), (2, 7), (3, 9)]
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    batch = view.__getitems__(keys)
    after = (torch.rand(1), np.random.rand(), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    assert after == (torch.rand(1), np.random.rand(), random.random())
    assert batch == [view[key] for key in keys]
    assert batch[0][0] == batch[2][0] and batch[0][0] != batch[1][0]  # same seed, same view
    assert [t for _, t in batch] == [0, 1, 2, 3]


def test_pad_crop_training_transform_pads_flips_and_normalises_only_as_asked():
    data = OmegaConf.create(dict(input_size=6, mean=[0.5], std=[0.25]))
    img = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    expected = torch.zeros(1, 6, 6)  # centred on a zero canvas, then normalised
    expected[0, 1:5, 1:5] = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)
    expected = (expected - 0.5) / 0.25

    def transform(**aug):
        return build_transform(OmegaConf.create(dict(train_crop='pad', auto_augment=None,
                                                     re_prob=0.0, **aug)), data, True)
    plain = transform(pad=0, hflip=0.0)
    assert len(plain.transforms) == 2  # crop, normalised tensor: no steps that do nothing
    torch.testing.assert_close(plain(img), expected, rtol=0, atol=2e-6)
    flipped = transform(pad=0, hflip=1.0)(img)
    torch.testing.assert_close(flipped, expected.flip(-1), rtol=0, atol=2e-6)
    torch.manual_seed(0)
    shifts = {tuple(transform(pad=2, hflip=0.0)(img)[0].argmax(1).tolist()) for _ in range(20)}
    assert len(shifts) > 1  # padding gives random shifts


def test_to_mode_only_accepts_one_or_three_channels(tmp_path):
    with pytest.raises(ValueError, match='in_chans=4'):
        save(tmp_path / 'a' / 'x.png', Image.new('RGB', (4, 4)))
        ImageFolder(str(tmp_path), in_chans=4)
    assert to_mode(Image.new('LA', (2, 2), (0, 0)), 1).getpixel((0, 0)) == 255

"""Grey images: data.in_chans=1 takes the ImageNet statistics averaged over the channels
unless data.mean/data.std are set; set for another channel count, they are refused."""
import pytest
from hydra import compose, initialize_config_dir

from conformer.engine.cli import config_dir
from conformer.engine.config import check


def compose_train(*overrides):
    with initialize_config_dir(config_dir(), version_base='1.3'):
        return compose('train', overrides=['data.root=/data', *overrides],
                       return_hydra_config=True)


def test_grey_images_get_the_averaged_imagenet_statistics():
    cfg = compose_train('data.in_chans=1')
    check(cfg)
    assert list(cfg.data.mean) == [pytest.approx((0.485 + 0.456 + 0.406) / 3, abs=1e-4)]
    assert list(cfg.data.std) == [pytest.approx((0.229 + 0.224 + 0.225) / 3, abs=1e-4)]


def test_statistics_given_are_kept_and_a_wrong_count_is_named():
    cfg = compose_train('data.in_chans=1', 'data.mean=[0.5]', 'data.std=[0.25]')
    check(cfg)
    assert (list(cfg.data.mean), list(cfg.data.std)) == ([0.5], [0.25])
    with pytest.raises(ValueError, match=r'data.mean/data.std need 1 values \(data.in_chans\), '
                                         r'got 3/1: give one value per channel'):
        check(compose_train('data.in_chans=1', 'data.mean=[0.5,0.5,0.5]', 'data.std=[0.25]'))

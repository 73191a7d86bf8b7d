"""Downloads against a loopback HTTP server: hash-checked URLs, a Hub-style endpoint, damaged
downloads and offline mode. Nothing here touches the network or the real caches."""
import hashlib
import os
import subprocess
import sys

import pytest
import timm
import torch

import conformer  # noqa: F401  registers the models and the weight loader
from conformer.weights import DownloadError
from conformer.weights.convert import convert

from helpers.http_server import LoopbackServer
from helpers.image_folders import make_folder
from helpers.train_runs import load, run_train
from helpers.weight_files import NANO, nano, to_mmpretrain


@pytest.fixture
def server():
    s = LoopbackServer()
    yield s
    s.close()


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """A nano model saved as mmpretrain does, under a name carrying its sha256 prefix."""
    torch.manual_seed(0)
    reference = nano()
    path = tmp_path_factory.mktemp('src') / 'weights.pth'
    torch.save({'meta': {}, 'state_dict': to_mmpretrain(reference.state_dict())}, path,
               _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    name = f'conformer-nano_in1k-{hashlib.sha256(data).hexdigest()[:8]}.pth'
    return reference, data, name, path


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    return tmp_path / 'torch' / 'hub' / 'checkpoints'


def from_url(url, **kwargs):
    return timm.create_model(NANO, pretrained=True, pretrained_cfg_overlay=dict(url=url),
                             **kwargs).eval()


def test_url_download_is_hash_checked_cached_and_exact(server, weights, torch_home):
    reference, data, name, _ = weights
    server.routes[f'/{name}'] = data
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(from_url(f'{server.url}/{name}')(x), reference(x))
        assert (torch_home / name).read_bytes() == data
        assert os.listdir(torch_home) == [name]
        assert torch.equal(from_url(f'{server.url}/{name}')(x), reference(x))
    assert server.gets == [f'/{name}']  # the second model came from the cache


def test_url_download_shows_progress_on_stderr(server, weights, torch_home, capfd,
                                               monkeypatch):
    _, data, name, _ = weights
    server.routes[f'/{name}'] = data
    monkeypatch.delenv('HF_HUB_DISABLE_PROGRESS_BARS', raising=False)
    from_url(f'{server.url}/{name}')
    out, err = capfd.readouterr()
    final = err.replace('\r', '\n').strip().splitlines()[-1]
    assert final.startswith(f'{name}: 100%') and out == ''
    assert f'{len(data) / 2 ** 20:.2f}M/{len(data) / 2 ** 20:.2f}M' in final
    from_url(f'{server.url}/{name}')  # a cache hit (hash re-checked) downloads nothing
    assert '100%' not in capfd.readouterr().err
    (torch_home / name).unlink()
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    disable_progress_bars()  # what HF_HUB_DISABLE_PROGRESS_BARS=1 sets
    try:
        from_url(f'{server.url}/{name}')
    finally:
        enable_progress_bars()
    assert '100%' not in capfd.readouterr().err


def test_partial_downloads_of_killed_processes_are_removed(server, weights, torch_home):
    """A download killed outright (SIGKILL, power loss) leaves its partial file, which can be
    hundreds of MB; the next download of that file removes it."""
    _, data, name, _ = weights
    server.routes[f'/{name}'] = data
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True, check=True).stdout.strip()
    torch_home.mkdir(parents=True)
    killed = torch_home / f'.{name}.{dead}-x1y2.partial'
    running = torch_home / f'.{name}.{os.getpid()}-z3.partial'  # a download still running
    other = torch_home / f'.other.pth.{dead}-x1y2.partial'  # another file's: left to its own
    for path in (killed, running, other):
        path.write_bytes(data[:100])
    from_url(f'{server.url}/{name}')
    assert sorted(os.listdir(torch_home)) == sorted([name, running.name, other.name])


def test_hash_mismatch_is_a_clear_error_and_caches_nothing(server, weights, torch_home):
    _, data, name, _ = weights
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    server.routes[f'/{name}'] = bytes(damaged)
    with pytest.raises(DownloadError) as e:
        from_url(f'{server.url}/{name}')
    prefix = name[-12:-4]
    assert f'{server.url}/{name}' in str(e.value) and f'promises {prefix}' in str(e.value)
    assert not torch_home.exists() or os.listdir(torch_home) == []


def test_truncated_download_caches_nothing(server, weights, torch_home):
    _, data, name, _ = weights
    server.routes[f'/{name}'] = data
    server.truncated.add(f'/{name}')
    with pytest.raises(DownloadError) as e:
        from_url(f'{server.url}/{name}')
    assert f'{server.url}/{name}: the download stopped after {len(data) // 2} of {len(data)} ' \
           f'bytes' in str(e.value)
    assert os.listdir(torch_home) == []


def test_missing_url_says_http_status_and_where_to_put_the_file(server, torch_home):
    with pytest.raises(DownloadError) as e:
        from_url(f'{server.url}/gone-0123abcd.pth')
    msg = str(e.value)
    assert 'HTTP 404' in msg and str(torch_home / 'gone-0123abcd.pth') in msg


def test_damaged_cached_file_is_reported_not_deleted(weights, torch_home):
    _, data, name, _ = weights
    torch_home.mkdir(parents=True)
    (torch_home / name).write_bytes(data[:100])
    with pytest.raises(DownloadError, match='Delete it to download it again'):
        from_url(f'http://127.0.0.1:9/{name}')
    assert (torch_home / name).read_bytes() == data[:100]


# huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME at import: run in a subprocess
CHILD = r"""
import sys, torch, timm, conformer
from conformer.weights import DownloadError, model_from_weights
out = {}
calls = {
    'hub': lambda: timm.create_model('hf-hub:org/nano', pretrained=True),
    'hub_never_cached': lambda: timm.create_model('hf-hub:org/never', pretrained=True),
    'hub_from_weights': lambda: model_from_weights('hf-hub:org/quick')[0],
    'hub_bin': lambda: timm.create_model('hf-hub:org/nano_bin', pretrained=True),
    'hub_overlay_empty_cache': lambda: timm.create_model(
        'conformer_nano_patch4', pretrained=True, cache_dir=sys.argv[2],
        pretrained_cfg_overlay=dict(hf_hub_id='org/nano')),
    'url': lambda: timm.create_model('conformer_nano_patch4', pretrained=True,
                                     pretrained_cfg_overlay=dict(url=sys.argv[3])),
    'url_empty_cache': lambda: timm.create_model(
        'conformer_nano_patch4', pretrained=True, cache_dir=sys.argv[2],
        pretrained_cfg_overlay=dict(url=sys.argv[3])),
    'in1k': lambda: timm.create_model('conformer_tiny_patch16', pretrained=True),
}
for name in sys.argv[4:]:
    try:
        with torch.no_grad():
            out[name] = calls[name]().state_dict()
    except DownloadError as e:
        out[name] = str(e)
torch.save(out, sys.argv[1])
"""


def run_child(tmp_path, env, url, *calls):
    empty = tmp_path / 'empty_cache'
    result = subprocess.run(
        [sys.executable, '-c', CHILD, str(tmp_path / 'out.pt'),
         str(empty), url, *calls],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / 'out.pt')


def test_hub_endpoint_then_offline(server, weights, quickstart, tmp_path):
    reference, data, name, path = weights
    repo = convert(path, tmp_path / 'repo', model_name=NANO)
    for f in repo.iterdir():
        server.routes[f'/org/nano/resolve/main/{f.name}'] = f.read_bytes()
    # a pooled-stem, grey model: only its config.json tells model_from_weights how to build it
    quick_path, quick = quickstart
    for f in convert(quick_path, tmp_path / 'quick').iterdir():
        server.routes[f'/org/quick/resolve/main/{f.name}'] = f.read_bytes()
    # a repo with only the pickle timm falls back to
    server.routes['/org/nano_bin/resolve/main/config.json'] = (repo / 'config.json').read_bytes()
    torch.save(reference.state_dict(), tmp_path / 'pytorch_model.bin')
    server.routes['/org/nano_bin/resolve/main/pytorch_model.bin'] = \
        (tmp_path / 'pytorch_model.bin').read_bytes()
    server.routes[f'/{name}'] = data
    torch_cache = tmp_path / 'torch' / 'hub' / 'checkpoints'
    env = {'HF_ENDPOINT': server.url, 'HF_HOME': str(tmp_path / 'hf'),
           'TORCH_HOME': str(tmp_path / 'torch'), 'HF_HUB_DISABLE_XET': '1'}
    expected = reference.state_dict()

    def same(loaded):  # the very weights: compared bitwise, independent of any numerics
        return loaded.keys() == expected.keys() and all(
            torch.equal(loaded[k], v) for k, v in expected.items())

    online = run_child(tmp_path, env, f'{server.url}/{name}', 'hub', 'hub_bin', 'url',
                       'hub_from_weights')
    assert all(same(online[call]) for call in ('hub', 'hub_bin', 'url'))
    quick_state = quick.state_dict()
    assert all(torch.equal(online['hub_from_weights'][k], v) for k, v in quick_state.items())
    assert (torch_cache / name).is_file()

    served = len(server.gets)
    offline = run_child(tmp_path, {**env, 'HF_HUB_OFFLINE': '1'}, f'{server.url}/{name}',
                        'hub', 'url', 'hub_overlay_empty_cache', 'url_empty_cache', 'in1k',
                        'hub_from_weights', 'hub_never_cached')
    assert len(server.gets) == served  # offline means no request at all
    assert same(offline['hub']) and same(offline['url'])
    assert all(torch.equal(offline['hub_from_weights'][k], v) for k, v in quick_state.items())
    msg = offline['hub_overlay_empty_cache']
    assert 'hf-hub:org/nano' in msg and 'HF_HUB_OFFLINE' in msg and 'hf download org/nano' in msg
    msg = offline['hub_never_cached']  # timm reads its config.json: named, with the fix
    assert 'hf-hub:org/never: its config.json' in msg and 'HF_HUB_OFFLINE' in msg \
        and 'hf download org/never' in msg
    msg = offline['url_empty_cache']
    assert f'{server.url}/{name}' in msg and str(tmp_path / 'empty_cache' / name) in msg
    in1k = 'conformer-tiny-p16_3rdparty_8xb128_in1k_20211206-f6860372.pth'
    msg = offline['in1k']
    assert ('https://download.openmmlab.com/mmclassification/v0/conformer/' + in1k in msg
            and str(torch_cache / in1k) in msg and 'f6860372' in msg)


def test_conformer_train_fine_tunes_from_hf_hub_weights_as_from_the_same_local_file(
        server, quickstart, tmp_path):
    """model.checkpoint=hf-hub:ORG/NAME fetches the weights and their config.json (which
    records the pooled-stem, grey architecture) and trains exactly as the same weights from a
    local file, asking the Hub for the weights once; offline and never cached, the run stops
    with one line naming the fix."""
    quick_path, _ = quickstart
    for f in convert(quick_path, tmp_path / 'quick').iterdir():
        server.routes[f'/org/quick/resolve/main/{f.name}'] = f.read_bytes()
    folder = make_folder(tmp_path / 'images', size=28)
    base = ['data=imagefolder', f'data.root={folder}', 'data.batch_size=6', 'data.num_workers=0',
            'aug=none', 'trainer.epochs=1', 'trainer.max_steps=2', 'trainer.threads=1',
            'trainer.deterministic=true', 'logging.progress=false', 'logging.plot=false']
    env = {'HF_ENDPOINT': server.url, 'HF_HOME': str(tmp_path / 'hf'), 'HF_HUB_DISABLE_XET': '1'}
    run_train(base, tmp_path / 'hub', 'model.checkpoint=hf-hub:org/quick', env=env)
    asked = [p for p in server.heads + server.gets if p.endswith('/model.safetensors')]
    assert len(asked) == 2, asked  # its metadata, then the file: not again for the model
    run_train(base, tmp_path / 'file', f'model.checkpoint={quick_path}')
    hub, local = (load(tmp_path / run / 'checkpoints' / 'last.pth') for run in ('hub', 'file'))
    assert hub['meta']['model_kwargs']['stem_type'] == 'pooled' and hub['meta']['in_chans'] == 1
    assert hub['model'].keys() == local['model'].keys()
    assert all(torch.equal(hub['model'][k], v) for k, v in local['model'].items())

    proc = run_train(base, tmp_path / 'offline', 'model.checkpoint=hf-hub:org/never',
                     env={**env, 'HF_HUB_OFFLINE': '1'}, wait=False)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and 'Traceback' not in out, out
    assert 'hf-hub:org/never' in out and 'HF_HUB_OFFLINE' in out, out

"""Files that are never silently wrong: every checkpoint the project reads (pretrained weights,
resume, eval) goes through one checked reader, and damaged, unsafe or mistyped weights are
refused with a message that names the file, the problem and the fix.

Checkpoint writes survive a full disk and kills: the message names the folder and the space
needed, and no partial file is left behind.

Every case writes a real file in the test: bit-flipped, NaN-holding, pickled-code, integer,
flattened, cut off by a file size limit.
"""
import os
import struct
import subprocess
import sys
import zipfile

import pytest
import timm
import torch
from safetensors.torch import save_file

import conformer  # noqa: F401  registers the models and the weight loader
from conformer.engine import checkpoint as ckpt
from conformer.weights import CheckpointError, load_weights, model_from_weights, read_checkpoint

NANO = 'conformer_nano_patch4'
# the two callers of the engine's reader: resume (trainer.py) and eval (evaluate.py)
READERS = [('trainer.resume', ckpt.TRAIN_STATE), ('checkpoint', ('model',))]


@pytest.fixture(scope='module')
def weights():
    torch.manual_seed(0)
    return timm.create_model(NANO).state_dict()


def training_checkpoint(weights):
    """A checkpoint with every entry conformer-train writes (small optimizer state)."""
    return dict(model=weights, state_dict_ema={k: v.clone() for k, v in weights.items()},
                optimizer={'state': {'conv1.weight': {'step': torch.tensor(3.),
                                                      'exp_avg': torch.zeros(4)}},
                           'param_groups': [{'lr': 1e-3, 'params': ['conv1.weight']}]},
                scheduler={}, scaler={}, step=3, epoch=0, step_in_epoch=3,
                sampler=dict(seed=0, global_batch=8, repeats=1, num_samples=24),
                rng=[ckpt.capture_rng()], world_size=1, meta={'variant': NANO})


def write_into_member(path, member_suffix, offset, data):
    """Overwrite bytes inside a stored zip member in place (its CRC-32 no longer matches)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        entry = next(e for e in archive.infolist() if e.filename.endswith(member_suffix))
    name_len, extra_len = struct.unpack('<HH', raw[entry.header_offset + 26:
                                                   entry.header_offset + 30])
    start = entry.header_offset + 30 + name_len + extra_len + offset
    raw[start:start + len(data)] = data
    path.write_bytes(bytes(raw))


def tensor_member(path, tensor):
    """The zip member name (data/<n>) holding `tensor`'s storage, found by its bytes."""
    wanted = tensor.numpy().tobytes()
    with zipfile.ZipFile(path) as archive:
        return next(e.filename for e in archive.infolist() if archive.read(e) == wanted)


@pytest.mark.parametrize('key, required', READERS)
def test_a_bit_flipped_weight_is_refused_by_resume_and_eval(key, required, weights, tmp_path):
    """-2.3e36 written over one weight of a valid checkpoint: torch.load reads it happily."""
    path = tmp_path / 'last.pth'
    ckpt.atomic_save(training_checkpoint(weights), path)
    member = tensor_member(path, weights['trans_cls_head.weight'])
    write_into_member(path, member, 4 * 5, struct.pack('<f', -2.3e36))
    assert torch.load(path, weights_only=True)['model']['trans_cls_head.weight'].min() < -1e36
    with pytest.raises(RuntimeError) as e:
        ckpt.load(path, key, required)
    message = str(e.value)
    assert message.startswith(f'cannot read {key}={path}: damaged PyTorch checkpoint (Bad '
                              f'CRC-32 for file')
    assert 'older step-*.pth' in message


@pytest.mark.parametrize('entry', ['model', 'state_dict_ema', 'ema', 'optimizer'])
@pytest.mark.parametrize('key, required', READERS)
def test_nan_in_weights_or_optimizer_state_is_refused(entry, key, required, weights, tmp_path):
    state = training_checkpoint(weights)
    if entry == 'optimizer':
        state['optimizer']['state']['conv1.weight']['exp_avg'][2] = float('nan')
        name = 'state.conv1.weight.exp_avg'
    else:
        # 'ema': where conformer-train kept EMA weights before it used timm's key
        state[entry] = dict(state.get(entry, weights),
                            **{'conv1.weight': weights['conv1.weight'].clone()})
        state[entry]['conv1.weight'][0, 0, 0, 0] = float('inf')
        name = 'conv1.weight'
    path = tmp_path / 'step-00000003.pth'
    ckpt.atomic_save(state, path)
    with pytest.raises(RuntimeError) as e:
        ckpt.load(path, key, required)
    numel = 4 if entry == 'optimizer' else weights['conv1.weight'].numel()
    assert (f"cannot read {key}={path}: '{name}' holds NaN or infinite values (1 of {numel}) in "
            f"its '{entry}' entry") in str(e.value)


def test_the_rng_states_nan_does_not_count_as_damage(weights, tmp_path):
    """Python's RNG keeps no Gaussian in reserve after seeding: stored as NaN, not damage."""
    import random
    random.seed(0)
    state = training_checkpoint(weights)
    assert torch.isnan(state['rng'][0]['python_gauss']).all()
    ckpt.atomic_save(state, tmp_path / 'last.pth')
    loaded = ckpt.load(tmp_path / 'last.pth', 'trainer.resume', ckpt.TRAIN_STATE)
    assert torch.equal(loaded['model']['conv1.weight'], weights['conv1.weight'])


class _RunsCode:
    def __reduce__(self):
        return os.system, ('touch pwned',)


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_pickled_code_is_named_and_not_loaded_by_every_reader(legacy, weights, tmp_path,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pth'
    state = dict(training_checkpoint(weights), hook=_RunsCode())
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    messages = []
    for key, required in READERS:
        with pytest.raises(RuntimeError) as e:
            ckpt.load(path, key, required)
        messages.append(str(e.value))
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    messages.append(str(e.value))
    for message in messages:
        assert 'holds pickled code (posix.system)' in message and 'was not loaded' in message
        assert 'corrupt' not in message and 'truncated' not in message
        assert 'cut short' not in message
    assert not (tmp_path / 'pwned').exists()


@pytest.mark.parametrize('dtype', [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused_not_cast(dtype, weights, tmp_path):
    """load_state_dict would cast them to float: every prediction the same class."""
    state = dict(weights)
    state['conv_trans_2.trans_block.attn.qkv.weight'] = \
        weights['conv_trans_2.trans_block.attn.qkv.weight'].round().to(dtype)
    save_file(state, tmp_path / 'model.safetensors')
    model = timm.create_model(NANO)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_weights(model, tmp_path / 'model.safetensors')
    assert (f'conv_trans_2.trans_block.attn.qkv.weight: file {dtype}, model floating point'
            in str(e.value))
    assert str(e.value).startswith(f'{tmp_path / "model.safetensors"}: 1 weights are stored as '
                                   f'integers or booleans')
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize('key', ['conv1.weight', 'conv_cls_head.weight',
                                 'conv_trans_3.trans_block.attn.qkv.weight'])
def test_a_flattened_tensor_names_its_key_and_shapes(key, weights, tmp_path):
    state = dict(weights)
    state[key] = weights[key].flatten()
    path = tmp_path / 'model.safetensors'
    save_file(state, path)
    found, model_shape = tuple(state[key].shape), tuple(weights[key].shape)
    with pytest.raises(CheckpointError) as e:
        load_weights(timm.create_model(NANO), path)
    assert f'{key}: file {found}, model {model_shape}' in str(e.value)
    assert 'flattened or reshaped' in str(e.value)
    with pytest.raises(CheckpointError) as e:
        model_from_weights(path, NANO)
    assert key in str(e.value) and str(found) in str(e.value)
    assert 'flattened or reshaped' in str(e.value)


FULL_DISK = """
import os, resource, signal, sys
from pathlib import Path
import torch
from conformer.engine import checkpoint as ckpt

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
folder = Path(sys.argv[1])
ckpt.atomic_save({'w': torch.ones(1000)}, folder / 'last.pth')  # the run's previous checkpoint
ckpt.atomic_save({'w': torch.ones(1000)}, folder / 'step-00000002.pth')
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    ckpt.atomic_save({'w': torch.zeros(3 << 18), 'v': torch.zeros(1 << 18)}, folder / 'last.pth')
except ckpt.NoSpaceError as e:
    print(e)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
ckpt.atomic_save({'w': torch.zeros(3 << 18)}, folder / 'step-00000003.pth')
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
os.link = lambda src, dst: (_ for _ in ()).throw(PermissionError(1, 'no hard links here'))
try:  # the copy that replaces a hard link on file systems without them
    ckpt._link(folder / 'step-00000003.pth', folder / 'best.pth')
except ckpt.NoSpaceError as e:
    print(e)
"""


def test_a_full_disk_is_named_and_leaves_no_partial_file(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the write fails part-way, as with ENOSPC."""
    result = subprocess.run([sys.executable, '-c', FULL_DISK, str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    fix = 'free space there or point the run at another disk, then resume'
    assert result.stdout.splitlines() == [
        f'no space left on device in {tmp_path}: 4 MB needed for a checkpoint (File too large); '
        f'{fix}',
        f'no space left on device in {tmp_path}: 3 MB needed for a checkpoint (File too large); '
        f'{fix}']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.pth', 'step-00000002.pth',
                                                          'step-00000003.pth']
    assert torch.equal(ckpt.load(tmp_path / 'last.pth')['w'], torch.ones(1000))


def test_temporary_files_of_killed_writers_are_removed_on_start(tmp_path):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True, check=True).stdout.strip()
    left = [tmp_path / f'.step-00000004.pth.tmp{dead}', tmp_path / f'.last.pth.tmp{dead}']
    writing = tmp_path / f'.step-00000005.pth.tmp{os.getpid()}'  # a live writer's file
    others = [tmp_path / '.notes', tmp_path / 'step-00000003.pth']
    for path in left + [writing] + others:
        path.write_bytes(b'x' * 100)
    manager = ckpt.CheckpointManager(tmp_path, keep_last=2)
    assert sorted(tmp_path.iterdir()) == sorted([writing] + others)
    manager.save({'step': 6}, 6, is_best=False)
    assert (tmp_path / 'last.pth').is_file() and writing.is_file()

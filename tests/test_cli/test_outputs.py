"""conformer.cli.outputs.writable_file: output paths are checked before the work, the check
leaves nothing behind, and an output is never one of the inputs."""
import os
import re

import pytest

from conformer.cli.outputs import refuse_inputs, writable_file


def test_a_new_file_in_new_folders_is_fine_and_the_probe_is_removed(tmp_path):
    path = writable_file(tmp_path / 'a' / 'b' / 'out.json', '--json')
    assert path == tmp_path / 'a' / 'b' / 'out.json'
    assert path.parent.is_dir() and not path.exists()


def test_an_existing_file_is_left_as_it_was(tmp_path):
    (tmp_path / 'out.json').write_text('old results')
    writable_file(tmp_path / 'out.json', '--json')
    assert (tmp_path / 'out.json').read_text() == 'old results'


@pytest.mark.parametrize('make, path, message', [
    (lambda tmp: None, '.', '--out . is a folder; name a file in it'),
    (lambda tmp: (tmp / 'sub').mkdir(), 'sub', 'is a folder; name a file in it'),
    (lambda tmp: (tmp / 'afile').write_text('x'), 'afile/out.json',
     'part of its folder path is a file'),
])
def test_unusable_paths_name_the_option_and_the_fix(make, path, message, tmp_path,
                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        writable_file(path, '--out')


def test_a_folder_that_cannot_be_created_is_refused():
    # /proc refuses new entries even to root, who may write through permission bits
    with pytest.raises(ValueError, match=re.escape('cannot write --out /proc/conformer-zoo/'
                                                   'out.json (No such file or directory)')):
        writable_file('/proc/conformer-zoo/out.json', '--out')


@pytest.mark.parametrize('output, message', [
    ('in.png', 'in.png is the input'),
    ('symlink.png', 'symlink.png is the input'),
    ('hardlink.png', 'hardlink.png is the input'),
    ('sub/../in.png', 'in.png is the input'),
    ('model/config.json', 'is a file of the input folder'),
])
def test_an_input_reached_by_any_path_is_refused(output, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'in.png').write_bytes(b'image')
    (tmp_path / 'sub').mkdir()
    os.symlink(tmp_path / 'in.png', tmp_path / 'symlink.png')
    os.link(tmp_path / 'in.png', tmp_path / 'hardlink.png')
    (tmp_path / 'model').mkdir()
    (tmp_path / 'model' / 'config.json').write_text('{}')
    inputs = [str(tmp_path / 'in.png'), 'model', None, 'https://example.com/w.pth']
    with pytest.raises(ValueError, match=re.escape(message)):
        writable_file(output, '--json', inputs=inputs)
    assert (tmp_path / 'in.png').read_bytes() == b'image'


def test_new_files_and_other_files_are_not_inputs(tmp_path):
    (tmp_path / 'in.png').write_bytes(b'image')
    (tmp_path / 'other.png').write_bytes(b'other')
    (tmp_path / 'model').mkdir()
    for output in ('other.png', 'new.json', 'model/new.json'):
        refuse_inputs(tmp_path / output, '--json', [tmp_path / 'in.png', tmp_path / 'model',
                                                    tmp_path / 'missing.pth'])

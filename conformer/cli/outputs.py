"""Where the command-line tools write their results: checked before the work, never an input."""
import os
from pathlib import Path
from typing import Iterable, Optional, Union

__all__ = ['refuse_inputs', 'writable_file']

PathLike = Union[str, Path]


def refuse_inputs(path: PathLike, flag: str, inputs: Iterable[Optional[PathLike]]) -> None:
    """Raise ValueError if writing ``path`` would replace one of ``inputs``.

    The same file counts however it is reached (a symlink, a hard link, ``..``). An input
    folder (a model folder, say) protects every file in it. Inputs that are None or do not
    exist on disk (URLs, ``hf-hub:`` names) cannot be overwritten and are skipped.

    Args:
        path: the output the tool is about to write.
        flag: the command-line option that named ``path``, for the message.
        inputs: the files and folders the tool reads.
    """
    path = Path(path)
    if not path.exists():
        return
    for source in inputs:
        if source is None or not os.path.exists(source):
            continue
        if os.path.isdir(source):
            if path.resolve().is_relative_to(Path(source).resolve()) and path.is_file():
                raise ValueError(f'{flag} {path} is a file of the input folder {source}; pick a '
                                 f'path outside it so the input is not overwritten')
        elif os.path.samefile(path, source):
            raise ValueError(f'{flag} {path} is the input {source} (the same file); pick '
                             f'another path so the input is not overwritten')


def writable_file(path: PathLike, flag: str, inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """``path`` once it is known that a file can be written there, creating missing folders.

    The tools call this before their work, so a mistyped or read-only output path, or one that
    would replace an input (see :func:`refuse_inputs`), stops them in a second instead of
    throwing away a long run at the end. Nothing is left behind: an existing file is opened
    for appending (not truncated), a probe file is removed again.

    Args:
        path: the file the tool will write.
        flag: the command-line option that named ``path``, for the error.
        inputs: the files and folders the tool reads, which ``path`` must not be.
    """
    path = Path(path)
    if not path.name or path.is_dir():
        raise ValueError(f'{flag} {path} is a folder; name a file in it')
    refuse_inputs(path, flag, inputs)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, 'a'):
            pass
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f'cannot write {flag} {path}: part of its folder path is a file; '
                         f'pick another path') from None
    except OSError as e:
        raise ValueError(f'cannot write {flag} {path} ({e.strerror}); pick a writable '
                         f'file path') from None
    if not existed:
        path.unlink()
    return path

"""Where the command-line tools write their results."""
from pathlib import Path
from typing import Union

__all__ = ['writable_file']


def writable_file(path: Union[str, Path], flag: str) -> Path:
    """``path`` once it is known that a file can be written there, creating missing folders.

    The tools call this before their work, so a mistyped or read-only output path stops them
    in a second instead of throwing away a long run at the end. Nothing is left behind: an
    existing file is opened for appending (not truncated), a probe file is removed again.
    ``flag`` names the command-line option in the error.
    """
    path = Path(path)
    existed = path.exists()
    if not path.name or path.is_dir():
        raise ValueError(f'{flag} {path} is a folder; name a file in it')
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

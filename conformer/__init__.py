"""conformer-zoo: the Conformer CNN-Transformer hybrid as a timm-native backbone.

`import conformer` registers every variant with timm, so `timm.create_model('conformer_...')`
and `timm.list_models('conformer*')` work.
"""
import importlib.util
import sys
from pathlib import Path


def _load_checkout_folder(name: str) -> None:
    """Make the repository's top-level ``<name>/`` folder the subpackage ``conformer.<name>``.

    An install maps it there (see pyproject.toml); a plain source checkout, such as the copy
    torch.hub downloads, has no such mapping. A checkout is recognised by its pyproject.toml
    beside this package, so an installed package never picks up an unrelated top-level folder
    (PyPI has a ``kernels`` package of its own).
    """
    package_dir = Path(__file__).resolve().parent
    folder = package_dir.parent / name
    if ((package_dir / name).exists() or not (package_dir.parent / 'pyproject.toml').is_file()
            or not (folder / '__init__.py').is_file()):
        return
    spec = importlib.util.spec_from_file_location(
        f'{__name__}.{name}', folder / '__init__.py', submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]  # as a failed import leaves no half-built module
        raise
    setattr(sys.modules[__name__], name, module)


_load_checkout_folder('kernels')
_load_checkout_folder('configs')

from . import weights  # noqa: E402, F401  (routes timm's pretrained=True for Conformer models)
from .models import Conformer  # noqa: E402  (needs conformer.kernels)

__version__ = '0.1.0'
__all__ = ['Conformer', '__version__']

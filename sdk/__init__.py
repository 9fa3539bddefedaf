"""edgetrain's device SDK: what runs on the board. Importing it never imports torch."""
from importlib.metadata import PackageNotFoundError, version

from .errors import EdgetrainError

try:
    __version__ = version("edgetrain")  # the installed distribution's, as ``edgetrain --version`` says
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["EdgetrainError", "__version__"]

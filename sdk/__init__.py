"""edgetrain's device SDK: what runs on the board. Importing it never imports torch."""
from .errors import EdgetrainError

__version__ = "0.1.0"
__all__ = ["EdgetrainError", "__version__"]

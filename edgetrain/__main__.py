"""``python -m edgetrain``: the same command as ``edgetrain``."""
import sys

from edgetrain.cli import main

sys.exit(main())

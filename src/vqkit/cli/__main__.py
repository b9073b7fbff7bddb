"""``python -m vqkit.cli``: the ``vqkit`` command (DDP launchers re-run it this way)."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())

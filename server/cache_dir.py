"""Where loraplex keeps what it derives once per machine: converted models and built kernels.

A leaf module, so the kernels (the bottom layer) and the model loader both read the one location.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$LORAPLEX_CACHE_DIR, else ~/.cache/loraplex."""
    return Path(os.environ.get("LORAPLEX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "loraplex"))

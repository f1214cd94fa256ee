"""Where datasets live. Nothing in learned-opt downloads unless the user says so."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataNotFoundError

DATA_ENV = "LEARNED_OPT_DATA"


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$LEARNED_OPT_DATA``.

    Raises :class:`DataNotFoundError` when neither is set; the message says how to set one.
    """
    if root is None:
        root = os.environ.get(DATA_ENV)
    if not root:
        raise DataNotFoundError(
            f"no data root given: pass --data-root DIR (or data_root=...) or set {DATA_ENV}=DIR, "
            "where DIR holds torchvision's layout (e.g. DIR/MNIST/raw); to let torchvision fetch the "
            "dataset, run `learned-opt corpus` or `demo` with --download (download=True in Python)"
        )
    return Path(root).expanduser()

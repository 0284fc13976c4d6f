"""A dataset of DualRes files for ``torch.utils.data``: pictures decoded in the loader's workers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from torch.utils.data import Dataset

from .codec import decode

EXTENSION = ".drx"


class DrxDataset(Dataset):
    """The ``.drx`` files of a folder (sorted, recursively) or a list of paths, each item the decoded
    picture as a float tensor (3 or 1, H, W) in [0, 1], after ``transform`` if given.

    Decoding runs in whatever process asks for the item, so a ``DataLoader(..., num_workers=N)``
    decodes N files at a time; each worker loads the weights once. ``weights`` and ``device`` are
    :func:`dualres_ext.decode`'s.
    """

    def __init__(
        self,
        files: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
        transform: Optional[Callable] = None,
        weights=None,
        device=None,
    ):
        if isinstance(files, (str, os.PathLike)):
            root = Path(files)
            if not root.is_dir():
                raise NotADirectoryError(f"{root}: not a folder of {EXTENSION} files")
            self.files = sorted(p for p in root.rglob(f"*{EXTENSION}") if p.is_file())
        else:
            self.files = [Path(f) for f in files]
        self.transform = transform
        self.weights = weights
        self.device = device

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        picture = decode(self.files[index].read_bytes(), device=self.device, output="tensor", weights=self.weights)
        return self.transform(picture) if self.transform is not None else picture


__all__ = ["DrxDataset", "EXTENSION"]

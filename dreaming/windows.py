"""Token windows: a corpus cut into fixed-length sequences, BOS first, each tagged with its document and source;
kept on disk as .npy arrays (memory-mapped on load) beside `sources.json`. Cutting documents into windows is
dreaming/build/corpus.py's `tokenize_windows`; everything that reads a bundle reads its windows through here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dreaming.atomic import atomic_directory


@dataclass
class Windows:
    tokens: np.ndarray  # [n_windows, window_length] int32; column 0 is BOS; tail padded with pad id
    lengths: np.ndarray  # [n_windows] int32, valid tokens incl. BOS
    document: np.ndarray  # [n_windows] int32, index of the document (in input order) the window came from
    source: np.ndarray  # [n_windows] int16, index into `sources`
    sources: list[str]

    def __len__(self) -> int:
        return len(self.tokens)

    def of_sources(self, names: list[str]) -> Windows:
        """Only the windows tagged with one of these sources (the tag list itself is kept, so tags mean the same)."""
        unknown = sorted(set(names) - set(self.sources))
        if unknown:
            raise ValueError(f"unknown corpus sources {unknown}; this corpus has {self.sources}")
        keep = np.isin(self.source, [self.sources.index(name) for name in names])
        return Windows(np.asarray(self.tokens[keep]), self.lengths[keep], self.document[keep], self.source[keep],
                       list(self.sources))


WINDOW_ARRAYS = ("tokens", "lengths", "document", "source")


def save_windows(windows: Windows, directory: Path) -> None:
    with atomic_directory(directory) as scratch:
        for name in WINDOW_ARRAYS:
            np.save(scratch / f"{name}.npy", getattr(windows, name))
        (scratch / "sources.json").write_text(json.dumps(windows.sources))


def load_windows(directory: Path) -> Windows:
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in WINDOW_ARRAYS}
    return Windows(**arrays, sources=json.loads((directory / "sources.json").read_text()))

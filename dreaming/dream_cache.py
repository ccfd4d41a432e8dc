"""Dream results on disk, keyed by (model + transcoder identity, feature, config).

Layout: `<directory>/<identity>/<layer>_<index>/<key>.json`, one DreamResult per file, where key is a hash of
the canonical (sorted-keys) JSON of the config. A bundle keeps its cache in `<bundle>/dreams/`. Writes go to a
temporary file renamed into place, so a reader never sees half a file; an unreadable file counts as missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from pydantic import ValidationError

from dreaming.epo import DreamConfig, DreamResult
from dreaming.features import Feature, parse_feature


def config_key(config: DreamConfig) -> str:
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def _safe(identity: str) -> str:
    """A directory name for an identity string (kept readable, made filesystem-safe)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", identity)[:120]


class DreamCache:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _feature_dir(self, identity: str, feature: Feature) -> Path:
        return self.directory / _safe(identity) / f"{feature.layer}_{feature.index}"

    def path(self, identity: str, feature: Feature, config: DreamConfig) -> Path:
        return self._feature_dir(identity, feature) / f"{config_key(config)}.json"

    def get(self, identity: str, feature: Feature, config: DreamConfig) -> DreamResult | None:
        return _read(self.path(identity, feature, config))

    def put(self, identity: str, result: DreamResult) -> Path:
        path = self.path(identity, parse_feature(result.feature), result.config)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".partial")
        try:
            with os.fdopen(handle, "w") as file:
                json.dump(result.model_dump(mode="json"), file)
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return path

    def for_feature(self, identity: str, feature: Feature) -> list[DreamResult]:
        """Every cached result of a feature, best fluent activation first."""
        directory = self._feature_dir(identity, feature)
        paths = sorted(directory.glob("*.json")) if directory.exists() else []
        results = [result for path in paths if (result := _read(path)) is not None]
        return sorted(results, key=lambda r: -(r.best_fluent.activation if r.best_fluent else float("-inf")))


def _read(path: Path) -> DreamResult | None:
    try:
        return DreamResult.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError):
        return None

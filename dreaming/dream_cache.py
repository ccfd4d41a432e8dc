"""Dream results on disk, and the one key of a dream: (engine version, model + transcoder identity, feature,
config, dataset max), shared with the service's job store.

Layout: `<directory>/<identity>/<layer>_<index>/<dream key>-<max key>.json`, one DreamResult per file, where the
dream key is `dream_key` (a result of an earlier engine version is never served as current) and the max key a hash
of the dataset max the result was scored against (its yardstick: EPO's target is divided by it and every
fraction_of_max is computed against it). Maxima rebuilt on another corpus change a feature's max, so a dream
requested again is computed again, and the old one is kept but reported as stale (`for_feature`). A bundle keeps its cache in
`<bundle>/dreams/`. Writes go to a temporary file renamed into place, so a reader never sees half a file; an
unreadable file counts as missing.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from dreaming.atomic import write_text_atomically
from dreaming.engine import ENGINE_VERSION, DreamConfig, DreamResult
from dreaming.features import Feature, parse_feature


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def dream_key(identity: str, feature: Feature | str, config: DreamConfig | dict, dataset_max: float | None) -> str:
    """The cache key of a dream: the same bundle (identity), feature, fully defaulted config and yardstick, under
    the same engine version, give the same key; a new engine version makes every request new work."""
    config = config.model_dump(mode="json") if isinstance(config, DreamConfig) else config
    key = canonical_json([ENGINE_VERSION, identity, str(feature), config, max_key(dataset_max)])
    return hashlib.sha256(key.encode()).hexdigest()


def max_key(dataset_max: float | None) -> str:
    """The cache key of a yardstick: "none" without one (no maxima, or a max of 0: a dead feature), else a hash
    of the float's repr (exact: a float survives a JSON round trip unchanged)."""
    if dataset_max is None or not dataset_max > 0:
        return "none"
    return hashlib.sha256(repr(float(dataset_max)).encode()).hexdigest()[:12]


def same_yardstick(scored_against: float | None, dataset_max: float | None) -> bool:
    """Was a result scored against `scored_against` measured with the current `dataset_max`?"""
    return max_key(scored_against) == max_key(dataset_max)


@dataclass
class CachedDream:
    result: DreamResult
    current: bool  # scored against the current dataset max; False: stale (another maxima build's yardstick)


def _safe(identity: str) -> str:
    """A directory name for an identity string (kept readable, made filesystem-safe)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", identity)[:120]


class DreamCache:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _feature_dir(self, identity: str, feature: Feature) -> Path:
        return self.directory / _safe(identity) / f"{feature.layer}_{feature.index}"

    def path(self, identity: str, feature: Feature, config: DreamConfig, dataset_max: float | None) -> Path:
        key = dream_key(identity, feature, config, dataset_max)[:24]
        return self._feature_dir(identity, feature) / f"{key}-{max_key(dataset_max)}.json"

    def get(self, identity: str, feature: Feature, config: DreamConfig, dataset_max: float | None
            ) -> DreamResult | None:
        """The result of this config scored against `dataset_max` (the current max), else None."""
        return _read(self.path(identity, feature, config, dataset_max))

    def put(self, identity: str, result: DreamResult) -> Path:
        """Store a result under its own config and the dataset max it was scored against."""
        path = self.path(identity, parse_feature(result.feature), result.config, result.dataset_max)
        write_text_atomically(path, json.dumps(result.model_dump(mode="json")))
        return path

    def features(self, identity: str) -> set[str]:
        """The features ("L/I") with at least one cached result (of any config or yardstick) for `identity`."""
        directory = self.directory / _safe(identity)
        if not directory.is_dir():
            return set()
        return {path.name.replace("_", "/") for path in directory.iterdir()
                if re.fullmatch(r"\d+_\d+", path.name) and any(path.glob("*.json"))}

    def for_feature(self, identity: str, feature: Feature, dataset_max: float | None) -> list[CachedDream]:
        """Every cached result of a feature, each marked current (scored against `dataset_max`, the feature's
        max now) or stale; current ones first, then best fluent activation first."""
        directory = self._feature_dir(identity, feature)
        paths = sorted(directory.glob("*.json")) if directory.exists() else []
        cached = [CachedDream(result, same_yardstick(result.dataset_max, dataset_max))
                  for path in paths if (result := _read(path)) is not None]
        return sorted(cached, key=lambda c: (not c.current, -(c.result.best_fluent.activation if c.result.best_fluent
                                                               else float("-inf"))))


def _read(path: Path) -> DreamResult | None:
    try:
        return DreamResult.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError):
        return None

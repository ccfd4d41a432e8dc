"""Feature ids: `LAYER/INDEX` (for a CLT the layer is the encoder layer), parsed and checked against a transcoder."""

from __future__ import annotations

import re
from dataclasses import dataclass

FEATURE_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Feature:
    layer: int
    index: int

    def __str__(self) -> str:
        return f"{self.layer}/{self.index}"


def parse_feature(text: str) -> Feature:
    """"12/345" -> Feature(12, 345); anything else is a ValueError that shows the expected form."""
    match = FEATURE_PATTERN.match(str(text))
    if not match:
        raise ValueError(f"malformed feature id {text!r}: expected LAYER/INDEX, e.g. 12/345")
    return Feature(int(match[1]), int(match[2]))


def check_feature(feature: Feature, layers: int | list[int], features_per_layer: int) -> Feature:
    """The feature itself if it exists in a dictionary of this shape (`layers`: how many, or the ones it has), else
    a ValueError naming the valid range."""
    if not isinstance(layers, int) and list(layers) == list(range(len(layers))):
        layers = len(layers)  # every layer from 0
    if isinstance(layers, int):
        if not 0 <= feature.layer < layers:
            raise ValueError(f"unknown feature {feature}: layer must be in 0..{layers - 1}")
    elif feature.layer not in layers:
        raise ValueError(f"unknown feature {feature}: this dictionary has layers {', '.join(map(str, layers))} only")
    if not 0 <= feature.index < features_per_layer:
        raise ValueError(f"unknown feature {feature}: index must be in 0..{features_per_layer - 1}")
    return feature


def parse_features(texts: list[str] | str) -> list[Feature]:
    """A list of ids, or one comma-separated string of them; repeats dropped, order kept."""
    if isinstance(texts, str):
        texts = [part for part in texts.split(",") if part.strip()]
    return list(dict.fromkeys(parse_feature(text) for text in texts))

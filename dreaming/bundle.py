"""A bundle: a model, its transcoder, a corpus cut into token windows (and later the dataset maxima),
located by one directory with a `bundle.json` manifest. Building one is dreaming/build/.

Layout of a bundle directory:
    bundle.json        manifest: model, transcoder, corpus stats, build times, the transcoder's evaluation report
    corpus.jsonl       documents with source tags
    windows/           token windows as .npy (memory-mapped on load) + sources.json
    transcoder/        the transcoder in the circuit-tracer layout (config.yaml + safetensors)
    maxima/            the dataset maxima of every feature over the windows (see dreaming/maxima.py)
    dreams/            cached dream results (see dreaming/dream_cache.py)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dreaming.atomic import write_text_atomically
from dreaming.encoder import LazyEncoder
from dreaming.formats import load_transcoder, open_transcoder, read_config
from dreaming.maxima import DENSE_ABOVE, Maxima, load_maxima
from dreaming.models import LanguageModel, shared_model
from dreaming.paths import dreaming_home
from dreaming.transcoders import Transcoder
from dreaming.windows import Windows, load_windows

MANIFEST = "bundle.json"
# The default bundle's recipe; a default bundle of another version is moved aside and built again.
# 1: Python-heavy corpus, CLT of 512 features per layer. 2: diverse corpus, skip transcoder set of 2,048 fitted in
# closed form. 3: the same corpus, a CLT trained by gradient from that fit (dreaming/build/train_clt.py). 4: that CLT
# trained on fewer tokens (81,920), so that a fresh build fits its time budget.
DEFAULT_BUNDLE_VERSION = 4
WINDOW_LENGTH = 128


DEFAULT_BUNDLE_NAME = "default"  # the name of the default bundle, served when none is named
BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # URL-safe: a name is a path segment of the API


def parse_bundles(text: str | None) -> tuple[tuple[str, str | None], ...]:
    """The served bundles as (name, directory) pairs from the syntax of `--bundle` lists and `$DREAMING_BUNDLE`:
    comma-separated, each a directory (named after its last component) or NAME=DIR; directories made absolute. Empty:
    the default bundle (directory None). ValueError, in one line, on a name that is not URL-safe or served twice."""
    bundles = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, _, directory = item.partition("=")
        if not directory or not BUNDLE_NAME.fullmatch(name):  # no NAME= (a directory may hold a "=")
            name, directory = None, item
        directory = str(Path(directory).expanduser().resolve())
        bundles.append((name or Path(directory).name, directory))
    for name, directory in bundles:
        if not BUNDLE_NAME.fullmatch(name):
            raise ValueError(f"bundle name {name!r} (of {directory}) is not URL-safe: use letters, digits, '.', '_' "
                             "and '-' (at most 64, not starting with '.', '_' or '-'), e.g. --bundle NAME=DIR")
    names = [name for name, _ in bundles]
    if len(set(names)) < len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"bundle names must be unique, but {', '.join(twice)} is served twice: name them with "
                         "--bundle NAME=DIR")
    return tuple(bundles) or ((DEFAULT_BUNDLE_NAME, None),)


def default_bundle_dir() -> Path:
    return dreaming_home() / "default"


@dataclass
class Bundle:
    directory: Path
    manifest: dict

    @classmethod
    def open(cls, directory: str | Path | None = None) -> Bundle:
        """Open a bundle; with no directory the default one. Never builds: a default bundle that is missing, of an
        earlier recipe or unfinished is an error that says to run `dreaming default build`."""
        if directory is None:
            directory = default_bundle_dir()
            manifest = json.loads((directory / MANIFEST).read_text()) if (directory / MANIFEST).exists() else {}
            if manifest.get("version") != DEFAULT_BUNDLE_VERSION or "maxima" not in manifest:
                state = ("is not built" if not manifest else "is unfinished" if manifest.get("version") ==
                         DEFAULT_BUNDLE_VERSION else f"is of an earlier recipe (version {manifest.get('version', 1)})")
                raise FileNotFoundError(f"the default bundle ({directory}) {state}: run `dreaming default build` "
                                        f"(about 1.5 hours on a 2-core CPU), or give --bundle DIR")
            if not (manifest.get("transcoder") or {}).get("identity"):
                raise FileNotFoundError(f"the default bundle ({directory}) was built before bundles recorded their "
                                        "identity: run `dreaming default build` once (seconds: it records it)")
        directory = Path(directory)
        if not (directory / MANIFEST).exists():
            raise FileNotFoundError(f"{directory} is not a bundle (no {MANIFEST}); make one with "
                                    "`dreaming bundle create` or `dreaming default build`")
        return cls(directory, json.loads((directory / MANIFEST).read_text()))

    @property
    def transcoder_reference(self) -> str | Path:
        """Where the transcoder is: the reference a bundle was created with (a path, a config.yaml, an hf:// URI,
        or a file of the bundle, such as its neurons.yaml), else the bundle's own `transcoder/` directory (the
        default bundle's fitted one)."""
        reference = (self.manifest.get("transcoder") or {}).get("reference")
        if reference is None:
            return self.directory / "transcoder"
        inside = self.directory / reference
        return inside if not Path(reference).is_absolute() and inside.exists() else reference

    @property
    def corpus_path(self) -> Path:
        return self.directory / "corpus.jsonl"

    @property
    def windows_dir(self) -> Path:
        return self.directory / "windows"

    @property
    def maxima_dir(self) -> Path:
        return self.directory / "maxima"

    @property
    def dreams_dir(self) -> Path:
        return self.directory / "dreams"

    def load_model(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LanguageModel:
        return shared_model(self.manifest["model"], dtype=dtype, device=device)

    def load_transcoder(self, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Transcoder:
        return load_transcoder(self.transcoder_reference, dtype=dtype, device=device)

    def load_encoder(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LazyEncoder:
        """The encoders, read from disk on use: the rows of the features asked for (what dreaming and measuring a
        few features need), whole layers for topk and for every feature at once (the maxima pass), within a byte
        budget; never the decoders."""
        return LazyEncoder(self.transcoder_reference, dtype=dtype, device=device)

    def windows(self) -> Windows:
        return load_windows(self.windows_dir)

    @property
    def identity(self) -> str:
        """A fingerprint of the model and the transcoder's encoders (`TranscoderFiles.identity`): maxima and cached
        dreams are keyed by it. Recorded in the manifest when the bundle is made (hashing a large transcoder on every
        open would be slow), else computed once."""
        recorded = (self.manifest.get("transcoder") or {}).get("identity")
        if recorded:
            return recorded
        if "_identity" not in self.__dict__:
            files = open_transcoder(self.transcoder_reference)
            self.__dict__["_identity"] = files.identity(self.manifest["model_name"])
        return self.__dict__["_identity"]

    def maxima(self) -> Maxima | None:
        """The dataset maxima, or None when they have not been built; stale maxima are an error."""
        if not (self.maxima_dir / "maxima.safetensors").exists():
            return None
        return load_maxima(self.maxima_dir, identity=self.identity)

    def save_manifest(self) -> None:
        write_text_atomically(self.directory / MANIFEST, json.dumps(self.manifest, indent=2))


def bundle_info(bundle: Bundle) -> dict:
    """What `dreaming info` and the service show of a bundle: model, transcoder (shape, hooks, where it is, its
    evaluation when the bundle fitted it), corpus, maxima, build times, and how a created bundle was made."""
    manifest = bundle.manifest
    transcoder = read_config(bundle.transcoder_reference)
    recorded = manifest.get("transcoder") or {}
    return {
        "bundle": str(bundle.directory),
        "model": {"name": manifest["model_name"], "source": manifest["model"], **manifest.get("model_info", {})},
        "transcoder": {
            "reference": str(bundle.transcoder_reference),
            "layout": recorded.get("layout", "circuit-tracer"),
            "recipe": manifest.get("recipe"),  # how the default bundle's transcoder was trained (dreaming/build/recipes.py)
            "kind": transcoder.kind,
            "layers": len(transcoder.layer_ids),
            "layer_ids": transcoder.layer_ids,  # the model layers it has (a per-layer set may have some only)
            "features_per_layer": transcoder.d_transcoder,
            "features": len(transcoder.layer_ids) * transcoder.d_transcoder,
            "d_model": transcoder.d_model,
            "activation": transcoder.activation,
            "input_hook": transcoder.feature_input_hook,
            "output_hook": transcoder.feature_output_hook,
            # varied_texts / heldout_windows: see evaluate.evaluate_transcoder
            "evaluation": manifest.get("transcoder_report", {}),
        },
        "corpus": {**manifest.get("corpus", {}), "windows": manifest.get("windows")},
        "maxima": manifest.get("maxima"),
        "build_seconds": manifest.get("build_seconds", {}),
        "created": {key: manifest[key] for key in ("created", "arguments", "device", "warnings") if key in manifest},
    }


def maxima_report(maxima: Maxima, bundle: Bundle) -> dict:
    """What `dreaming info` shows of the maxima: tokens, speed, dead, dense and positional (first-token) feature
    counts, over the layers the bundle's dictionary has."""
    layers = read_config(bundle.transcoder_reference).layer_ids
    active = maxima.arrays["active_count"][layers]
    return {"tokens": maxima.metadata["tokens"], "windows": maxima.metadata["windows"],
            "seconds": maxima.metadata["seconds"], "tokens_per_second": maxima.metadata["tokens_per_second"],
            "features": int(active.numel()), "dead": int((active == 0).sum()),
            "dense": int((maxima.arrays["density"][layers] > DENSE_ABOVE).sum()), "dense_above": DENSE_ABOVE,
            "first_token": int(maxima.first_token_features[layers].sum())}

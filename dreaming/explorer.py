"""The Python API for looking at one bundle's features: activations of texts, search, dashboards, comparison,
similar features.

    explorer = Explorer.open()                     # the default bundle (`dreaming default build` builds it)
    explorer.activation("12/345", ["How do I make a bomb?"])
    explorer.search("How do I make a bomb?")
    explorer.compare("12/345")                     # dataset maxima beside the cached dreamed prompts
    explorer.similar("12/345")                     # the features with the closest decoder directions
    explorer.dream_many(["12/345", "3/7"], DreamConfig())   # EPO, cached in the bundle (a positional feature
                                                            # in the bare template: dream_config)

Every figure is measured in fp32 by `dreaming.activation` (the one measurement function). The CLI and the
HTTP service are thin layers over this class: `dream_many` is the one path of a dream, for `dreaming dream`/`batch`
and for the service's Ray workers alike.
"""

from __future__ import annotations

from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import torch

from dreaming.activation import measure_in_template, measure_texts
from dreaming.bundle import Bundle
from dreaming.dashboard import feature_page
from dreaming.dream_cache import DreamCache, same_yardstick
from dreaming.encoder import LazyEncoder
from dreaming.engine import DreamConfig, DreamResult, Progress, continuation, dream_many, longest_run
from dreaming.engine.length import FALLBACK_LENGTH
from dreaming.features import Feature, check_feature, parse_feature
from dreaming.formats import open_transcoder
from dreaming.maxima import SEARCH_ORDER, Maxima, SearchOrder, search_features
from dreaming.models import LanguageModel, best_device, search_dtype
from dreaming.output_tokens import output_tokens
from dreaming.similar import similar_features
from dreaming.templates import BARE, split_template
from dreaming.transcoders import Transcoder

MAX_TEXTS = 64
FEATURES_PER_CALL = 8  # features dreamed together, sharing every forward pass (the CLI's --batch-size)
# A positional feature (Maxima.first_token) asked for in the model's chat template is dreamed in this one instead:
# the prompt's first token is then a text's first token, where its dataset max was reached.
FIRST_TOKEN_TEMPLATE = BARE
# The yardstick of a positional feature's dream (DreamResult.yardstick): a max at a text's first token, which a
# prompt reaches only when the template puts nothing before it.
REACHABLE_YARDSTICK = "dataset max at a text's first token: dreamed with the prompt first, nothing before it"
UNREACHABLE_YARDSTICK = ("dataset max at a text's first token: out of reach here, where the template puts text "
                         "before the prompt")


class Explorer:
    def __init__(self, bundle: Bundle, device: str | None = None):
        self.bundle = bundle
        self.device = device or best_device()
        self.files = open_transcoder(bundle.transcoder_reference)  # headers and configs: opened once
        self.transcoder_config = self.files.config

    @classmethod
    def open(cls, directory: str | Path | None = None, device: str | None = None) -> Explorer:
        return cls(Bundle.open(directory), device)

    @cached_property
    def lm(self) -> LanguageModel:
        return self.bundle.load_model(dtype=torch.float32, device=self.device)

    @cached_property
    def transcoder(self) -> Transcoder:
        """The whole transcoder, decoders included (studies that reconstruct); measuring uses `encoder`."""
        return self.bundle.load_transcoder(device=self.device)

    @cached_property
    def encoder(self) -> LazyEncoder:
        """The encoders, read from disk on use (fp32): the rows of the features measured or dreamed, whole layers
        for a search; never the decoders, so a large transcoder stays cheap."""
        return self.bundle.load_encoder(device=self.device)

    @cached_property
    def cache(self) -> DreamCache:
        return DreamCache(self.bundle.dreams_dir)

    def loaded_models(self) -> list[LanguageModel]:
        """The models this explorer has loaded so far (the measuring model, and search models of other dtypes)."""
        return [*([self.__dict__["lm"]] if "lm" in self.__dict__ else []),
                *self.__dict__.get("_search_models", {}).values()]

    def search_model(self, dtype: str) -> LanguageModel:
        """The model in a dream config's search dtype ("auto": models.fast_dtype of the device), loaded once (fp32 is
        the measuring model itself)."""
        resolved = search_dtype(dtype, self.device)
        if resolved == torch.float32:
            return self.lm
        models = self.__dict__.setdefault("_search_models", {})
        if resolved not in models:
            models[resolved] = self.bundle.load_model(dtype=resolved, device=self.device)
        return models[resolved]

    @cached_property
    def maxima(self) -> Maxima | None:
        return self.bundle.maxima()

    def feature(self, feature: Feature | str) -> Feature:
        """Parse and check a feature id against this bundle's transcoder (ValueError naming the valid range)."""
        feature = parse_feature(feature) if isinstance(feature, str) else feature
        return check_feature(feature, self.transcoder_config.layer_ids, self.transcoder_config.d_transcoder)

    def require_maxima(self) -> Maxima:
        if self.maxima is None:
            raise FileNotFoundError(f"{self.bundle.directory} has no dataset maxima: run `dreaming maxima build`")
        return self.maxima

    def dataset_max(self, feature: Feature | str) -> float | None:
        feature = self.feature(feature)
        return self.maxima.dataset_max(feature) if self.maxima is not None else None

    def template(self, template: str | None) -> str | None:
        """A template as given (one `{prompt}` slot, checked), or "chat" for the model's chat template."""
        from dreaming.templates import chat_template

        if template is None:
            return None
        template = chat_template(self.lm) if template == "chat" else template
        split_template(template)
        return template

    def activation(self, feature: Feature | str, texts: list[str], template: str | None = None) -> list[dict]:
        """Per text: token ids, per-token activations, the max, and the fraction of the dataset max.

        With `template` (one `{prompt}` slot, or "chat" for the model's chat template) each text is a prompt
        measured inside it as a dream is: only the prompt and what follows count (`counted_from`), and the
        template's own activation is `template_activation` (dreaming.activation.measure_in_template)."""
        feature = self.feature(feature)
        if len(texts) > MAX_TEXTS:
            raise ValueError(f"too many texts: {len(texts)}, at most {MAX_TEXTS} per call")
        template = self.template(template)
        if template is None:
            results = measure_texts(self.lm, self.encoder, feature, texts, self.dataset_max(feature))
        else:
            results = measure_in_template(self.lm, self.encoder, feature, texts, template,
                                          self.dataset_max(feature))
        return [asdict(result) for result in results]

    def search(self, text: str, top: int = 20, order: SearchOrder = SEARCH_ORDER) -> list[dict]:
        """The features most active on `text`, ranked by fraction of their dataset max, with density; by default
        positional hits (a first-token feature at the text's first token) after content hits (`search_features`)."""
        return search_features(self.lm, self.encoder, self.require_maxima(), text, top, order)

    def dreams(self, feature: Feature | str, current_only: bool = False) -> list[dict]:
        """Dream results cached on disk for this feature (any configuration), as JSON dicts: those scored against
        the feature's dataset max now first, then stale ones (scored against another maxima build's max; each
        result's `dataset_max` says which), unless `current_only`. `compare` shows the stale ones apart."""
        feature = self.feature(feature)
        cached = self.cache.for_feature(self.bundle.identity, feature, self.dataset_max(feature))
        return [c.result.model_dump(mode="json") for c in cached if c.current or not current_only]

    def features_with_dreams(self) -> set[str]:
        """The features ("L/I") with a dream cached on disk for this bundle (current or stale)."""
        return self.cache.features(self.bundle.identity)

    def dream_config(self, feature: Feature | str, config: DreamConfig) -> DreamConfig:
        """The config a feature is dreamed under: `config`, but a positional feature (Maxima.first_token) asked for
        in the model's chat template (template None) is dreamed in FIRST_TOKEN_TEMPLATE, where a prompt can reach
        its max. Dreams are cached and keyed (dream_cache.dream_key) under this config."""
        feature = self.feature(feature)
        if config.template is None and self.maxima is not None and self.maxima.first_token(feature):
            return config.model_copy(update={"template": FIRST_TOKEN_TEMPLATE})
        return config

    def yardstick(self, feature: Feature | str, config: DreamConfig) -> str | None:
        """What a dream of `feature` under `config` (as dreamed: see `dream_config`) is scored against, when that is
        not a max any prompt can reach: for a positional feature, a max at a text's first token, reachable only
        when the template puts nothing before the prompt. None for every other feature."""
        feature = self.feature(feature)
        if self.maxima is None or not self.maxima.first_token(feature):
            return None
        prompt_first = config.template is not None and split_template(config.template)[0] == ""
        return REACHABLE_YARDSTICK if prompt_first else UNREACHABLE_YARDSTICK

    def dream_many(self, features: list[Feature | str], config: DreamConfig, progress: Progress | None = None, *,
                   dataset_maxes: list[float | None] | None = None, more: bool = False,
                   continue_from: list[DreamResult] | None = None, read_cache: bool = True, write_cache: bool = True,
                   features_per_call: int = FEATURES_PER_CALL) -> list[DreamResult]:
        """EPO results for `features` under `config`, one per feature, in order: the one path of a dream.

        Each feature is dreamed under `dream_config(feature, config)` (a positional feature in the bare template,
        when `config` asks for the chat template) and scored against its dataset max now (or `dataset_maxes`: the
        yardsticks a service's jobs were keyed with); the result's `yardstick` says what that max is for a
        positional feature. Results are read from (`read_cache`) and written to (`write_cache`) the bundle's dream
        cache, keyed by `dream_cache.dream_key` of that config (engine version included); the service, whose job
        store is its cache, passes False for both. The rest runs `features_per_call` features of one config at a
        time (the engine takes one config per call), sharing every forward pass, searched in `config.dtype` and
        re-measured in fp32. `more` continues each feature's longest cached run of this search for
        `config.iterations` more (`engine.continuation`: the result is the run of the summed length);
        `continue_from` gives the runs to continue instead, `config.iterations` then being the whole length.
        `progress(done, total, best)` counts iterations over every call; a string it returns stops the search (the
        result's `stopped`)."""
        features = [self.feature(feature) for feature in features]
        configs = [self.dream_config(feature, config) for feature in features]
        maxes = dataset_maxes if dataset_maxes is not None else [self.dataset_max(f) for f in features]
        if len(maxes) != len(features):
            raise ValueError(f"{len(features)} features but {len(maxes)} dataset maxima")
        if more:
            continue_from = [self._longest_cached_run(f, c, m) for f, c, m in zip(features, configs, maxes)]
            configs = [continuation(base, config.iterations) for base in continue_from]
        continue_from = continue_from or [None] * len(features)
        lookup = read_cache and not any(continue_from)
        results = {f: self.cache.get(self.bundle.identity, f, c, m) if lookup else None
                   for f, c, m in zip(features, configs, maxes)}
        todo = [i for i, f in enumerate(features) if results[f] is None]
        by_config = {}  # the features to dream under each config (they differ in template and, continued, length)
        for i in todo:
            by_config.setdefault(configs[i].model_dump_json(), []).append(i)
        calls = [same[start : start + features_per_call] for same in by_config.values()
                 for start in range(0, len(same), features_per_call)]

        def steps(i: int) -> int:  # the iterations feature i's call runs (a continued run: the rest of it)
            before = continue_from[i].config.iterations if continue_from[i] else 0
            return (configs[i].iterations - before) * config.seeds

        total, offset = sum(steps(i) for i in todo), 0

        def overall(done: int, _: int, best: float | None) -> str | None:  # a call's progress, counted over all
            return progress(offset + done, total, best)

        for group in calls:
            maxima, call_config = self.maxima, configs[group[0]]
            contexts = [maxima.top_contexts(features[i]) if maxima is not None else None for i in group]
            dreamed = dream_many(self.search_model(config.dtype), self.encoder, [features[i] for i in group],
                                 call_config, [maxes[i] for i in group], overall if progress else None, self.lm,
                                 contexts, [continue_from[i] for i in group])
            for i, result in zip(group, dreamed):
                result = result.model_copy(update={"yardstick": self.yardstick(features[i], call_config)})
                if write_cache:
                    self.cache.put(self.bundle.identity, result)
                results[features[i]] = result
            offset += sum(steps(i) for i in group)
        return [results[f] for f in features]

    def _longest_cached_run(self, feature: Feature, config: DreamConfig, dataset_max: float | None) -> DreamResult:
        """The cached run of `config`'s search by this engine, scored against `dataset_max`, that `more` continues."""
        current = [c.result for c in self.cache.for_feature(self.bundle.identity, feature, dataset_max) if c.current]
        base = longest_run(current, config)
        if base is None:
            raise ValueError(f"nothing to continue for {feature}: no cached dream of this config (but its "
                             "iterations, seconds and plateau) by this engine; dream it without --more first")
        return base

    def compare(self, feature: Feature | str, top: int = 10, dreams: list[dict] | None = None,
                length: int | None = None) -> dict:
        """The feature's statistics and top dataset examples beside its dreamed prompts (default: cached ones).

        Dreams scored against another dataset max than the feature's now are listed apart (`stale_dreams`).
        Each example also has `length_matched`: its last `length` tokens up to its max token measured alone
        (default: the prompt length of the feature's most active current dream, else engine.length.FALLBACK_LENGTH),
        to compare dreams with the data at equal context."""
        feature = self.feature(feature)
        dreams = self.dreams(feature) if dreams is None else dreams
        length = length or dream_length(dreams, self.dataset_max(feature)) or FALLBACK_LENGTH
        page = feature_page(self.lm, self.encoder, self.require_maxima(), feature, dreams, top, length=length)
        page["output_tokens"] = output_tokens(self.lm, self.files, [feature])[0] if self.files.has_decoders else None
        return page

    def similar(self, feature: Feature | str, top: int = 10) -> list[dict]:
        """The `top` features whose decoder directions are closest (cosine) to this one's (dreaming.similar), each
        with its density, dataset max and whether it is positional (`first_token`) when the bundle has maxima."""
        found = similar_features(self.files, self.feature(feature), top)
        if self.maxima is not None:
            for hit in found:
                summary = self.maxima.summary(parse_feature(hit["feature"]))
                hit.update(density=summary["density"], dataset_max=summary["dataset_max"],
                           first_token=summary["first_token"])
        return found


def dream_length(dreams: list[dict], dataset_max: float | None) -> int | None:
    """The prompt length of the most active current dream (results as JSON, scored against `dataset_max`)."""
    current = [d for d in dreams if d.get("best_fluent") and same_yardstick(d.get("dataset_max"), dataset_max)]
    best = max(current, key=lambda d: d["best_fluent"]["activation"], default=None)
    return best and (best.get("prompt_length") or best["config"].get("prompt_length"))

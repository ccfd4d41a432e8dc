"""Feature dashboards exported to circuit-tracer's and Neuronpedia's formats, and Neuronpedia's activation exports
imported as dataset maxima: the yardstick of a published transcoder without recomputing it.

Owns
  export_circuit_tracer   one feature JSON per feature, where circuit-tracer's local graph viewer reads it
  export_neuronpedia      Neuronpedia export batches: features and activations as gzipped JSONL
  export_gemma_scope_2    the bundle's dictionary itself in Gemma Scope 2's layout, which circuit-tracer loads with a
                          CLT's skip (its own CLT loader reads no skip)
  import_neuronpedia      a maxima directory (dreaming/maxima.py) from Neuronpedia activation batches
  cantor_id               circuit-tracer's number for a feature

The formats, as their public sources define them:
  circuit-tracer (github.com/safety-research/circuit-tracer)
    - the file is the pydantic `Model` of circuit_tracer/frontend/feature_models.py (commit d797c824; the same
      fields in later versions): transcoder_id, index, examples_quantiles [{quantile_name, examples: [{tokens,
      tokens_acts_list, train_token_ind, is_repeated_datapoint}]}], top_logits, bottom_logits, act_min, act_max,
      quantile_values, histogram, activation_frequency;
    - the viewer (frontend/assets/feature_examples/init-feature-examples.js, commit 196e2cec) fetches
      `features/{scan}/{id}.json`: `scan` is the graph's metadata.scan and `id` the Cantor pairing of layer and
      index, (l + i)(l + i + 1)/2 + i, the number `Node.feature_node` gives a feature (frontend/graph_models.py,
      commit 21ab88aa). `circuit-tracer start-server --graph_file_dir G --features_dir OUT/features` serves them
      (frontend/local_server.py, commit 196e2cec);
    - the viewer draws `histogram` as equal bins over [act_min, act_max], reads `quantile_values[i]` as the
      activation at percentile i + 1 and shows `tokens` as text (render-act-histogram.js,
      init-feature-examples-list.js, commit d797c824).
  Neuronpedia (github.com/hijohnnylin/neuronpedia, commit ebb8426f)
    - utils/neuronpedia-utils/neuronpedia_utils/export-data.py writes `{modelId}/{sourceId}/features/batch-N.jsonl.gz`
      and `.../activations/batch-N.jsonl.gz`, batch N holding features 1024 N .. 1024 N + 1023, each record the
      columns it selects (NEURON_COLUMNS, ACTIVATION_COLUMNS), typed by neuronpedia_utils/db_models/feature.py and
      activation.py; apps/webapp/app/api/admin/import/route.ts reads them back;
    - a source id is `{layer}-{source set}`; `tokens` are the tokenizer's token strings ("Ġthe", "▁the"), which
      the webapp shows as text; top examples have binMin = binContains = -1, an activation range's examples its
      bounds binMin, binMax.

What an export writes. A feature's examples are its top dataset examples and its interval examples
(`Maxima.interval_examples`), each window re-measured in fp32 (`measure_token_ids`) for its per-token values; the
example's own activation stays the one the maxima pass stored (the yardstick, which import reads back exactly).
  circuit-tracer: groups "top activations" (named "top activations (positional: fires on a text's first token)"
    for a positional feature, Maxima.first_token), one per activation range ("activations in (0.316, 1]", ...),
    and from the bundle's cached dreams scored against the current dataset max: "best fluent dream" and "best
    novel dream" (the most active of their best_fluent and best_novel prompts, named with both yardsticks: "best
    fluent dream: 96% of the dataset max, 131% of the best 32-token dataset excerpt"), then "dreams" (frontier and
    diverse set, most active first, at most MAX_DREAMS), each measured as it was dreamed, their names followed by
    the dreams' yardstick for a positional feature (DreamResult.yardstick); act_min 0, act_max the dataset max;
    histogram and quantile_values from the maxima's log-binned histogram (uniform inside a bin); top and bottom
    logits from `output_tokens`. Newlines and tabs show as ⏎ and →.
  Neuronpedia: maxValue, maxValueTokenIndex = the stored value and its token (for an interval example a sampled
    token, not necessarily the window's max); values re-measured; maxActApprox = the dataset max, frac_nonzero =
    density, freq_hist_data_bar_* = that histogram, pos_str/neg_str = the output tokens; the other columns empty.
    No dreams: they are not dataset examples, and import would take them for the yardstick. The format has no
    field for a positional feature: its top record's maxValueTokenIndex (1, a text's first token) shows it.

What import fills. A feature's top records (binMin -1; all its records when none is marked) become its top
examples, at most one per window, strongest first: max_activation = the largest maxValue (float32, exact),
top_values and top_position from maxValue and maxValueTokenIndex. Windows are the records' tokens turned into ids
by the bundle's tokenizer (token strings first, else display text), BOS added when missing, one window per
distinct sequence, tagged with its dataSource ("neuronpedia" without one). density = frac_nonzero of the features
batches when there are any. What an export does not carry is marked unknown rather than guessed: density (without
features batches), mean_active and source_max are NaN, active_count -1, the histogram all zeros, tokens 0, and
metadata["imported"]["unknown"] names them. Interval examples are not imported.
"""

from __future__ import annotations

import gzip
import itertools
import json
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field, ValidationError, model_validator
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoTokenizer

from dreaming.activation import TextActivation, measure_token_ids
from dreaming.atomic import atomic_directory
from dreaming.bundle import Bundle
from dreaming.encoder import LazyEncoder
from dreaming.engine import NOVEL_BELOW
from dreaming.explorer import Explorer
from dreaming.features import Feature, check_feature
from dreaming.formats import read_config
from dreaming.formats.gemma_scope import save_gemma_scope_2
from dreaming.maxima import FORMAT_VERSION, HISTOGRAM_EDGES, Maxima, load_maxima
from dreaming.models import LanguageModel, ensure_default_model
from dreaming.output_tokens import output_tokens
from dreaming.special_tokens import bos_token_id, pad_token_id
from dreaming.transcoders import Transcoder
from dreaming.windows import Windows, save_windows

TOP_GROUP, DREAMS_GROUP = "top activations", "dreams"
FIRST_TOKEN_GROUP = f"{TOP_GROUP} (positional: fires on a text's first token)"  # a positional feature's top group
BEST_GROUPS = {"best_fluent": "best fluent dream",  # a dream result's field: the group of the most active of them
               "best_novel": f"best novel dream (no run of {NOVEL_BELOW} tokens shared with the top activations)"}
MAX_DREAMS = 20  # dreamed prompts per feature in the circuit-tracer file
OUTPUT_TOKENS = 10  # top and bottom logits per feature
HISTOGRAM_BINS, FINE_GRID = 50, 1000  # equal bins over [0, max]; the grid quantiles are read on
OUTPUT_CHUNK = 64  # features whose output tokens are computed together
NEURONPEDIA_BATCH = 1024  # features per batch file, as export-data.py cuts them
SOURCE_SET = "dreaming"  # Neuronpedia source ids are "{layer}-dreaming"
CREATOR_ID = "dreaming"  # Neuronpedia needs a user of this id to import the records; replace it there if need be
DISPLAY = str.maketrans({"\n": "⏎", "\t": "→", "\r": "↵"})
# The columns export-data.py selects, in its order.
NEURON_COLUMNS = (
    "modelId", "layer", "index", "maxActApprox", "creatorId", "frac_nonzero", "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "neuron_alignment_indices", "neuron_alignment_l1", "neuron_alignment_values", "correlated_neurons_indices",
    "correlated_neurons_l1", "correlated_neurons_pearson", "decoder_weights_dist", "neg_str", "neg_values", "pos_str",
    "pos_values", "sourceSetName", "topkCosSimIndices", "topkCosSimValues", "vector", "vectorLabel", "hookName",
    "vectorDefaultSteerStrength", "hasVector",
)  # fmt: skip
ACTIVATION_COLUMNS = (
    "id", "modelId", "layer", "index", "creatorId", "dataSource", "tokens", "maxValue", "minValue", "values",
    "maxValueTokenIndex", "dfaValues", "dfaMaxValue", "dfaTargetIndex", "binContains", "binMin", "binMax",
)  # fmt: skip
UNKNOWN = ("tokens", "active_count", "mean_active", "histogram", "source_max")


def cantor_id(feature: Feature) -> int:
    """circuit-tracer's number for a feature: the Cantor pairing of its layer and index."""
    total = feature.layer + feature.index
    return total * (total + 1) // 2 + feature.index


# ---------------------------------------------------------------------------------------------------- examples


@dataclass
class Example:
    activation: float  # as the maxima pass stored it (a dream's: as re-measured)
    position: int  # the example's token
    window: int | None  # None for a dreamed prompt
    measured: TextActivation  # the whole sequence re-measured in fp32


def range_name(low: float, high: float | None) -> str:
    return f"activations above {low:.3g}" if high is None else f"activations in ({low:.3g}, {high:.3g}]"


def dream_points(results: Iterable[dict]) -> list[dict]:
    """The distinct prompts (frontier and diverse set) of dream results, most active first, at most MAX_DREAMS."""
    points = {tuple(p["token_ids"]): p for result in results
              for p in [*result.get("frontier", []), *(result.get("diverse") or [])]}
    return sorted(points.values(), key=lambda p: p["activation"], reverse=True)[:MAX_DREAMS]


def dream_groups(results: list[dict]) -> list[tuple[str, list[dict]]]:
    """(name, prompts) of the groups of dream results (JSON dicts) that have any: the most active of their best
    fluent and of their best novel prompts, then their distinct prompts (`dream_points`); the names end with the
    results' yardsticks (a positional feature's), if any."""
    groups = [(name + both_yardsticks(best), [best]) for field, name in BEST_GROUPS.items()
              if (found := [result[field] for result in results if result.get(field)])
              and (best := max(found, key=lambda p: p["activation"]))]
    points = dream_points(results)
    groups += [(DREAMS_GROUP, points)] if points else []
    yardsticks = "".join(f" ({y})" for y in sorted({r["yardstick"] for r in results if r.get("yardstick")}))
    return [(name + yardsticks, points) for name, points in groups]


def both_yardsticks(point: dict) -> str:
    """': 96% of the dataset max, 131% of the best 32-token dataset excerpt' of a dreamed prompt (JSON), as far as it
    has them."""
    parts = [f"{point['fraction_of_max']:.0%} of the dataset max"] if point.get("fraction_of_max") is not None else []
    if point.get("fraction_of_length_matched") is not None:
        parts.append(f"{point['fraction_of_length_matched']:.0%} of the best {point['prompt_tokens']}-token dataset "
                     "excerpt")
    return ": " + ", ".join(parts) if parts else ""


def measured_groups(lm: LanguageModel, encoder: Transcoder | LazyEncoder, maxima: Maxima, feature: Feature,
                    dreams: Iterable[dict] = ()) -> list[dict]:
    """The feature's examples in groups, every sequence re-measured in one batched call: the top examples, each
    activation range's (highest first), then the dream groups of `dreams` (dream results as JSON dicts; see
    `dream_groups`) when there are any. Each group: {"name", "low", "high" (the range's bounds, else None),
    "examples": [Example]}."""
    groups = [{"name": TOP_GROUP, "low": None, "high": None, "examples": maxima.top_examples(feature)}]
    groups += [{"name": range_name(r["low"], r["high"]), **r} for r in maxima.interval_examples(feature)]
    dreamed = dream_groups(list(dreams))
    points = [point for _, group in dreamed for point in group]
    sequences = [ids for group in groups for ids, _ in maxima.contexts(group["examples"])]
    counted_from = [1] * len(sequences) + [p["counted_from"] for p in points]
    sequences += [p["token_ids"] for p in points]
    measured = iter(measure_token_ids(lm, encoder, feature, sequences, counted_from=counted_from))
    for group in groups:
        group["examples"] = [Example(value, position, window, next(measured))
                             for value, window, position in group["examples"]]
    for name, group in dreamed:
        examples = []
        for m in (next(measured) for _ in group):
            position = m.counted_from + int(np.argmax(m.token_activations[m.counted_from:]))
            examples.append(Example(m.activation, position, None, m))
        groups.append({"name": name, "low": None, "high": None, "examples": examples})
    return groups


def activation_distribution(maxima: Maxima, feature: Feature) -> tuple[list[float], list[float], list[float]]:
    """(bin centres, counts, quantile values): the feature's active-token activations in HISTOGRAM_BINS equal bins
    over [0, dataset max], and the activation at each percentile 1..100, read from the maxima's log-binned
    histogram (its mass spread evenly inside each bin). Empty lists when there are no counts."""
    at = (feature.layer, feature.index)
    counts = maxima.arrays["histogram"][at].double().numpy()[1:]  # bin 0 holds the inactive tokens
    dataset_max = maxima.dataset_max(feature)
    if counts.sum() <= 0 or dataset_max <= 0:
        return [], [], []
    edges = maxima.arrays["histogram_edges"].double().numpy()
    x = np.append(edges, max(dataset_max, edges[-1]))  # the last bin holds everything above the top edge
    y = np.concatenate([[0.0], np.cumsum(counts)])
    grid = np.linspace(0.0, dataset_max, FINE_GRID + 1)
    cdf = np.interp(grid, x, y)
    cdf[-1] = y[-1]  # nothing lies above the max: the mass of its bin beyond it belongs below
    quantiles = grid[np.minimum(np.searchsorted(cdf, np.arange(1, 101) / 100 * y[-1]), FINE_GRID)]
    step = FINE_GRID // HISTOGRAM_BINS
    coarse = grid[::step]
    return ((coarse[:-1] + coarse[1:]) / 2).tolist(), np.diff(cdf[::step]).tolist(), quantiles.tolist()


def finite(value: float) -> float:
    """JSON has no NaN: an unknown statistic (imported maxima) is written as 0, the formats' own default."""
    return value if np.isfinite(value) else 0.0


# ---------------------------------------------------------------------------------------------------- export


def each_feature(explorer: Explorer, features: list[Feature] | None, desc: str, progress: bool
                 ) -> Iterator[tuple[Feature, dict]]:
    """The features asked for (default: every feature), checked and in order, each with its output tokens."""
    config = explorer.transcoder_config
    if features is None:
        features = [Feature(layer, index) for layer in config.layer_ids for index in range(config.d_transcoder)]
    features = sorted({explorer.feature(feature) for feature in features})
    with tqdm(total=len(features), desc=desc, unit="feature", disable=not progress) as bar:
        for start in range(0, len(features), OUTPUT_CHUNK):
            chunk = features[start : start + OUTPUT_CHUNK]
            outputs = output_tokens(explorer.lm, explorer.bundle.transcoder_reference, chunk, OUTPUT_TOKENS)
            for feature, output in zip(chunk, outputs):
                yield feature, output
                bar.update()


def export_report(out_dir: Path, files: set[Path], features: int, started: float, **extra) -> dict:
    seconds = time.perf_counter() - started
    return {"directory": str(out_dir), "features": features, "files": len(files),
            "bytes": sum(path.stat().st_size for path in files), "seconds": round(seconds, 2),
            "seconds_per_feature": round(seconds / max(features, 1), 3), **extra}


def circuit_tracer_feature(maxima: Maxima, feature: Feature, groups: list[dict], output: dict, scan: str) -> dict:
    """One feature's file: the fields of circuit-tracer's feature_models.Model."""
    seen, quantiles = set(), []
    for group in groups:
        examples = []
        for example in group["examples"]:
            examples.append({"tokens_acts_list": example.measured.token_activations,
                             "train_token_ind": example.position,
                             "is_repeated_datapoint": example.window is not None and example.window in seen,
                             "tokens": [piece.translate(DISPLAY) for piece in example.measured.pieces]})
            seen.add(example.window)
        if examples:
            positional = group["name"] == TOP_GROUP and maxima.first_token(feature)
            quantiles.append({"quantile_name": FIRST_TOKEN_GROUP if positional else group["name"],
                              "examples": examples})
    _, histogram, quantile_values = activation_distribution(maxima, feature)
    density = float(maxima.arrays["density"][feature.layer, feature.index])
    return {"transcoder_id": scan, "index": cantor_id(feature), "examples_quantiles": quantiles,
            "top_logits": [token for token, _ in output["top"]],
            "bottom_logits": [token for token, _ in output["bottom"]],
            "act_min": 0.0, "act_max": maxima.dataset_max(feature), "quantile_values": quantile_values,
            "histogram": histogram, "activation_frequency": finite(density)}


def export_circuit_tracer(explorer: Explorer, out_dir: str | Path, features: list[Feature] | None = None,
                          scan: str | None = None, progress: bool = True) -> dict:
    """Write `out_dir/features/{scan}/{cantor_id}.json` for each feature (default: every one); `scan` is the
    name the graphs that show these features carry in metadata.scan (default: dreaming-<bundle identity>)."""
    maxima = explorer.require_maxima()
    scan = scan or f"dreaming-{explorer.bundle.identity}"
    directory = Path(out_dir) / "features" / scan
    directory.mkdir(parents=True, exist_ok=True)
    encoder = explorer.bundle.load_encoder(explorer.device)
    started, files = time.perf_counter(), set()
    for feature, output in each_feature(explorer, features, "circuit-tracer", progress):
        groups = measured_groups(explorer.lm, encoder, maxima, feature, explorer.dreams(feature, current_only=True))
        path = directory / f"{cantor_id(feature)}.json"
        path.write_text(json.dumps(circuit_tracer_feature(maxima, feature, groups, output, scan), allow_nan=False))
        files.add(path)
    return export_report(Path(out_dir), files, len(files), started, format="circuit-tracer", scan=scan)


def export_gemma_scope_2(explorer: Explorer, out_dir: str | Path) -> dict:
    """Write the bundle's dictionary (encoders, decoders and skip) to `out_dir` in Gemma Scope 2's layout
    (dreaming/formats/gemma_scope.py), hook points named by the model's module paths. circuit-tracer reads a CLT's
    skip from these files (`load_gemma_scope_2_clt`), not from its own CLT layout."""
    if not explorer.files.has_decoders:
        raise ValueError(f"{explorer.bundle.transcoder_reference} has no decoders (a model's neurons): nothing for "
                         "another tool to reconstruct with")
    started = time.perf_counter()
    transcoder = explorer.bundle.load_transcoder()
    out_dir = Path(out_dir)
    save_gemma_scope_2(transcoder, out_dir, explorer.lm.module_path)
    c = transcoder.config
    return export_report(out_dir, set(out_dir.rglob("*.*")), len(c.layer_ids) * c.d_transcoder, started,
                         format="gemma-scope-2", kind=c.kind, layers=c.layer_ids, skip=c.skip_connection)


def model_slug(name: str) -> str:
    """A Neuronpedia model id from a model name: "SmolLM2-135M-Instruct" -> "smollm2-135m-instruct"."""
    return re.sub(r"[^a-z0-9.]+", "-", Path(name).name.lower()).strip("-")


def neuronpedia_records(maxima: Maxima, feature: Feature, groups: list[dict], output: dict, model_id: str,
                        source_id: str, identity: str) -> tuple[dict, list[dict]]:
    """One feature's Neuronpedia Neuron record and Activation records, with exactly export-data.py's columns."""
    dataset_max = maxima.dataset_max(feature)
    centres, counts, _ = activation_distribution(maxima, feature)
    empty = {name: [] for name in ("logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                                   "neuron_alignment_indices", "neuron_alignment_l1", "neuron_alignment_values",
                                   "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                                   "decoder_weights_dist", "topkCosSimIndices", "topkCosSimValues", "vector")}
    neuron = {**empty, "modelId": model_id, "layer": source_id, "index": str(feature.index),
              "maxActApprox": dataset_max, "creatorId": CREATOR_ID,
              "frac_nonzero": finite(float(maxima.arrays["density"][feature.layer, feature.index])),
              "freq_hist_data_bar_heights": counts, "freq_hist_data_bar_values": centres,
              "neg_str": [token for token, _ in output["bottom"]], "neg_values": [v for _, v in output["bottom"]],
              "pos_str": [token for token, _ in output["top"]], "pos_values": [v for _, v in output["top"]],
              "sourceSetName": SOURCE_SET, "vectorLabel": None, "hookName": None,
              "vectorDefaultSteerStrength": None, "hasVector": False}
    windows, activations = maxima.windows, []
    for group in groups:
        top = group["name"] == TOP_GROUP
        for example in group["examples"]:
            values = example.measured.token_activations
            activations.append({
                "id": f"{identity}-{feature.layer}-{feature.index}-{len(activations)}", "modelId": model_id,
                "layer": source_id, "index": str(feature.index), "creatorId": CREATOR_ID,
                "dataSource": windows.sources[int(windows.source[example.window])],
                "tokens": example.measured.tokens, "maxValue": example.activation, "minValue": min(values),
                "values": values, "maxValueTokenIndex": example.position, "dfaValues": [], "dfaMaxValue": None,
                "dfaTargetIndex": None, "binContains": -1.0 if top else None,
                "binMin": -1.0 if top else group["low"],
                "binMax": dataset_max if top or group["high"] is None else group["high"]})
    return {name: neuron[name] for name in NEURON_COLUMNS}, activations


def export_neuronpedia(explorer: Explorer, out_dir: str | Path, features: list[Feature] | None = None,
                       progress: bool = True) -> dict:
    """Write `out_dir/{model id}/{layer}-dreaming/{features,activations}/batch-N.jsonl.gz` for the features (default:
    every one), a batch file holding the features asked for among its 1,024; a batch file written is replaced."""
    maxima = explorer.require_maxima()
    model_id = model_slug(explorer.bundle.manifest["model_name"])
    encoder = explorer.bundle.load_encoder(explorer.device)
    started, files, count = time.perf_counter(), set(), 0

    def batch(item: tuple[Feature, dict]) -> tuple[int, int]:  # features come sorted: one batch open at a time
        return item[0].layer, item[0].index // NEURONPEDIA_BATCH

    for (layer, number), group in itertools.groupby(each_feature(explorer, features, "neuronpedia", progress), batch):
        source_id = f"{layer}-{SOURCE_SET}"
        paths = [Path(out_dir) / model_id / source_id / kind / f"batch-{number}.jsonl.gz"
                 for kind in ("features", "activations")]
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(paths[0], "wt", encoding="utf-8") as neurons, \
                gzip.open(paths[1], "wt", encoding="utf-8") as examples:
            for feature, output in group:
                groups = measured_groups(explorer.lm, encoder, maxima, feature)
                neuron, activations = neuronpedia_records(maxima, feature, groups, output, model_id, source_id,
                                                          explorer.bundle.identity)
                neurons.write(json.dumps(neuron, allow_nan=False) + "\n")
                examples.writelines(json.dumps(record, allow_nan=False) + "\n" for record in activations)
                count += 1
        files.update(paths)
    return export_report(Path(out_dir), files, count, started, format="neuronpedia", model_id=model_id)


# ---------------------------------------------------------------------------------------------------- import


class ActivationRecord(BaseModel):
    """The fields of a Neuronpedia Activation record that import reads (the others are ignored)."""

    layer: str
    index: int = Field(ge=0)
    tokens: list[str] = Field(min_length=1)
    maxValue: float = Field(allow_inf_nan=False)
    maxValueTokenIndex: int = Field(ge=0)
    binMin: float | None = None
    dataSource: str | None = None

    @model_validator(mode="after")
    def _token_in_range(self):
        if self.maxValueTokenIndex >= len(self.tokens):
            raise ValueError(f"maxValueTokenIndex {self.maxValueTokenIndex} is past the {len(self.tokens)} tokens")
        return self


class NeuronRecord(BaseModel):
    """The fields of a Neuronpedia Neuron (feature) record that import reads."""

    layer: str
    index: int = Field(ge=0)
    frac_nonzero: float | None = None


def read_batches(directory: Path, kind: str, model: type[BaseModel]) -> Iterator[tuple[Path, BaseModel]]:
    """The records of every `*/{kind}/batch-N.jsonl.gz` under `directory`, validated; a bad line is a ValueError
    naming its file and line."""
    for path in sorted(directory.rglob(f"{kind}/batch-*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    yield path, model.model_validate_json(line)
                except ValidationError as error:
                    raise ValueError(f"{path}, line {number}: not a Neuronpedia {kind} record: {error}") from None


class SourceLayers:
    """Neuronpedia source ids ("12-gemmascope-transcoder-16k") -> the transcoder layer they name."""

    def __init__(self, n_layers: int, d_transcoder: int):
        self.shape, self.layers = (n_layers, d_transcoder), {}

    def feature(self, source_id: str, index: int) -> Feature:
        if source_id not in self.layers:
            match = re.match(r"(\d+)-", source_id)
            if not match:
                raise ValueError(f"Neuronpedia source {source_id!r} does not start with its layer (LAYER-NAME)")
            layer = int(match[1])
            if layer in self.layers.values():
                other = next(s for s, l in self.layers.items() if l == layer)
                raise ValueError(f"sources {other!r} and {source_id!r} both name layer {layer}: import one at a time")
            self.layers[source_id] = layer
        feature = Feature(self.layers[source_id], index)
        try:
            return check_feature(feature, *self.shape)
        except ValueError as error:
            raise ValueError(f"the export's feature {feature} (source {source_id!r}) is not in this bundle's "
                             f"transcoder: {error}") from None


def bundle_tokenizer(bundle: Bundle):
    """The tokenizer of the bundle's model, without its weights (resolved as `load_model` resolves the model)."""
    model = bundle.manifest["model"]
    return AutoTokenizer.from_pretrained(str(ensure_default_model()) if model == "default" else model)


class TokenIds:
    """Token strings -> ids: the tokenizer's own strings ("Ġthe") first, else display text (" the", as
    `token_pieces` shows it; built on first need, the lowest id when several tokens show the same)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.vocab, self.shown = tokenizer, tokenizer.get_vocab(), None

    def __call__(self, tokens: list[str]) -> list[int]:
        ids = []
        for token in tokens:
            found = self.vocab.get(token)
            if found is None:
                if self.shown is None:
                    ordered = sorted(self.vocab, key=self.vocab.get)
                    self.shown = {}
                    for string in ordered:
                        self.shown.setdefault(self.tokenizer.convert_tokens_to_string([string]), self.vocab[string])
                found = self.shown.get(token)
                if found is None:
                    raise ValueError(f"token {token!r} is neither a token nor a token's text in this model's "
                                     "vocabulary: is the export of another model?")
            ids.append(found)
        return ids


class WindowTable:
    """Distinct token sequences (BOS first) collected into `Windows`, one window per sequence."""

    def __init__(self):
        self.index, self.rows, self.tags, self.source = {}, [], {}, []

    def add(self, ids: list[int], tag: str) -> int:
        key = tuple(ids)
        if key not in self.index:
            self.index[key] = len(self.rows)
            self.rows.append(np.asarray(ids, dtype=np.int32))
            self.source.append(self.tags.setdefault(tag, len(self.tags)))
        return self.index[key]

    def windows(self, pad_id: int) -> Windows:
        lengths = np.array([len(row) for row in self.rows], dtype=np.int32)
        tokens = np.full((len(self.rows), int(lengths.max())), pad_id, dtype=np.int32)
        for row, ids in zip(tokens, self.rows):
            row[: len(ids)] = ids
        return Windows(tokens=tokens, lengths=lengths, document=np.arange(len(self.rows), dtype=np.int32),
                       source=np.array(self.source, dtype=np.int16), sources=list(self.tags))


def imported_examples(export_dir: Path, tokenizer, sources: SourceLayers, progress: bool
                      ) -> tuple[dict[Feature, list[tuple[float, int, int]]], WindowTable, dict]:
    """Per feature its top examples [(value, window, position)], strongest first (ties in file order), at most one
    per window; the windows; and counts of what was read."""
    bos = bos_token_id(tokenizer)
    to_ids, table = TokenIds(tokenizer), WindowTable()
    found = defaultdict(list)  # feature -> [(marked top, value, window, position)]
    counts = {"examples": 0, "skipped_bos": 0}
    batches = read_batches(export_dir, "activations", ActivationRecord)
    for _, record in tqdm(batches, desc="import", unit="record", disable=not progress):
        feature = sources.feature(record.layer, record.index)
        ids, position = to_ids(record.tokens), record.maxValueTokenIndex
        if ids[0] != bos:
            ids, position = [bos, *ids], position + 1
        elif position == 0:  # its max on the BOS, which no measurement counts
            counts["skipped_bos"] += 1
            continue
        window = table.add(ids, record.dataSource or "neuronpedia")
        found[feature].append((record.binMin in (None, -1), record.maxValue, window, position))
        counts["examples"] += 1
    top = {}
    for feature, records in found.items():
        best = {}  # window -> (value, position)
        for _, value, window, position in [r for r in records if r[0]] or records:
            if window not in best or value > best[window][0]:
                best[window] = (value, position)
        top[feature] = sorted(((v, w, p) for w, (v, p) in best.items()), key=lambda e: -e[0])
    if not top:
        raise ValueError(f"{export_dir}: the activation batches hold no example beyond a BOS token")
    return top, table, counts


def top_arrays(top: dict[Feature, list[tuple[float, int, int]]], n_layers: int, n_features: int
               ) -> dict[str, torch.Tensor]:
    """max_activation and the top_* arrays of a maxima file, k = the most examples any feature has."""
    k = max(len(examples) for examples in top.values())
    values = np.zeros((n_layers, n_features, k), np.float32)
    windows = np.full((n_layers, n_features, k), -1, np.int32)
    positions = np.zeros((n_layers, n_features, k), np.int32)
    for feature, examples in top.items():
        at = (feature.layer, feature.index, slice(0, len(examples)))
        values[at], windows[at], positions[at] = zip(*examples)
    return {"max_activation": torch.from_numpy(values[..., 0].copy()), "top_values": torch.from_numpy(values),
            "top_window": torch.from_numpy(windows), "top_position": torch.from_numpy(positions)}


def import_neuronpedia(bundle: Bundle, export_dir: str | Path, out_dir: str | Path | None = None,
                       progress: bool = True) -> Maxima:
    """The dataset maxima of `bundle`'s transcoder read from a Neuronpedia export (a directory with
    `*/activations/batch-N.jsonl.gz`, and optionally `*/features/...`), written to `out_dir` (default: the bundle's
    maxima) as `dreaming maxima build` writes them; see the module docstring for what is filled and how."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise FileNotFoundError(f"no Neuronpedia export at {export_dir} (not a directory)")
    if not any(export_dir.rglob("activations/batch-*.jsonl.gz")):
        raise FileNotFoundError(f"no Neuronpedia activation batches (*/activations/batch-N.jsonl.gz) in {export_dir}")
    started = time.perf_counter()
    config = read_config(bundle.transcoder_reference)
    L, F = config.n_layers, config.d_transcoder
    tokenizer = bundle_tokenizer(bundle)
    sources = SourceLayers(L, F)
    top, table, counts = imported_examples(export_dir, tokenizer, sources, progress)
    density, unknown = np.full((L, F), np.nan, np.float32), list(UNKNOWN)
    neurons = [neuron for _, neuron in read_batches(export_dir, "features", NeuronRecord)]
    for neuron in neurons:
        if neuron.frac_nonzero is not None:
            feature = sources.feature(neuron.layer, neuron.index)
            density[feature.layer, feature.index] = neuron.frac_nonzero
    if not neurons:
        unknown.append("density")
    windows = table.windows(pad_token_id(tokenizer))
    arrays = {
        **top_arrays(top, L, F),
        "active_count": torch.full((L, F), -1, dtype=torch.int64),
        "density": torch.from_numpy(density),
        "mean_active": torch.full((L, F), float("nan")),
        "histogram": torch.zeros((L, F, len(HISTOGRAM_EDGES) + 1), dtype=torch.int64),
        "histogram_edges": torch.from_numpy(HISTOGRAM_EDGES),
        "source_max": torch.full((L, F, len(windows.sources)), float("nan")),
    }
    metadata = {"format_version": FORMAT_VERSION, "identity": bundle.identity, "model": bundle.manifest["model_name"],
                "tokens": 0, "windows": len(windows), "top_k": arrays["top_values"].shape[-1],
                "seconds": round(time.perf_counter() - started, 1), "tokens_per_second": 0.0,
                "imported": {"format": "neuronpedia", "sources": sources.layers, "features": len(top), **counts,
                             "unknown": unknown}}
    out_dir = Path(out_dir) if out_dir is not None else bundle.maxima_dir
    with atomic_directory(out_dir) as scratch:
        save_file(arrays, str(scratch / "maxima.safetensors"), metadata={"dreaming": json.dumps(metadata)})
        save_windows(windows, scratch / "windows")
    return load_maxima(out_dir, identity=bundle.identity)

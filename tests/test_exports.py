"""Exports to circuit-tracer and Neuronpedia, checked against schemas written from their public sources, and the
Neuronpedia import: export -> import gives the same yardstick (dataset max, top examples, their tokens)."""

import gzip
import json
import shutil
from datetime import datetime

import pytest
import torch
from dream_results import dream_result, dreamed_prompt
from pydantic import BaseModel, ConfigDict

from dreaming.bundle import Bundle
from dreaming.cli import main
from dreaming.dream_cache import DreamCache
from dreaming.engine import DreamConfig
from dreaming.explorer import Explorer
from dreaming.exports import (
    ACTIVATION_COLUMNS,
    DREAMS_GROUP,
    NEURON_COLUMNS,
    TOP_GROUP,
    cantor_id,
    export_circuit_tracer,
    export_neuronpedia,
    import_neuronpedia,
)
from dreaming.features import Feature
from dreaming.maxima import load_maxima

FEATURES = [Feature(0, 0), Feature(1, 13), Feature(2, 5), Feature(2, 23)]  # 0/0 is dead


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# circuit-tracer's feature file: circuit_tracer/frontend/feature_models.py, github.com/safety-research/circuit-tracer
# at commit d797c824c0ffe3a0274071e32d92962a36656212 (the same fields, as list[...], at later commits).
class CTExample(Strict):
    tokens_acts_list: list[float]
    train_token_ind: int
    is_repeated_datapoint: bool
    tokens: list[str]


class CTExamplesQuantile(Strict):
    quantile_name: str
    examples: list[CTExample]


class CTFeature(Strict):
    transcoder_id: str
    index: int
    examples_quantiles: list[CTExamplesQuantile]
    top_logits: list[str]
    bottom_logits: list[str]
    act_min: float
    act_max: float
    quantile_values: list[float]
    histogram: list[float]
    activation_frequency: float


# Neuronpedia's exported records: utils/neuronpedia-utils/neuronpedia_utils/db_models/activation.py and feature.py,
# github.com/hijohnnylin/neuronpedia at commit ebb8426fc550ad5d1f76d52c271a624af3c08a57 (dataclasses built with
# cls(**record): no other field is accepted; a field without a default is required).
class NPActivation(Strict):
    id: str
    tokens: list[str]
    index: str
    layer: str
    modelId: str
    maxValue: float
    maxValueTokenIndex: int
    minValue: float
    values: list[float]
    creatorId: str
    dataSource: str | None = None
    dataIndex: str | None = None
    dfaValues: list[float] = []
    dfaTargetIndex: int | None = None
    dfaMaxValue: float | None = None
    createdAt: datetime | None = None
    lossValues: list[float] = []
    logitContributions: str | None = None
    binMin: float | None = None
    binMax: float | None = None
    binContains: float | None = None
    qualifyingTokenIndex: int | None = None
    zIndices: list[list[int]] | None = None
    zValues: list[float] | None = None


class NPFeature(Strict):
    modelId: str
    layer: str
    index: str
    creatorId: str | None = None
    createdAt: datetime | None = None
    maxActApprox: float | None = 0
    hasVector: bool = False
    vector: list[float] = []
    vectorLabel: str | None = None
    vectorDefaultSteerStrength: float | None = 10
    hookName: str | None = None
    topkCosSimIndices: list[int] = []
    topkCosSimValues: list[float] = []
    neuron_alignment_indices: list[int] = []
    neuron_alignment_values: list[float] = []
    neuron_alignment_l1: list[float] = []
    correlated_neurons_indices: list[int] = []
    correlated_neurons_pearson: list[float] = []
    correlated_neurons_l1: list[float] = []
    correlated_features_indices: list[int] = []
    correlated_features_pearson: list[float] = []
    correlated_features_l1: list[float] = []
    neg_str: list[str] = []
    neg_values: list[float] = []
    pos_str: list[str] = []
    pos_values: list[float] = []
    frac_nonzero: float = 0
    freq_hist_data_bar_heights: list[float] = []
    freq_hist_data_bar_values: list[float] = []
    logits_hist_data_bar_heights: list[float] = []
    logits_hist_data_bar_values: list[float] = []
    decoder_weights_dist: list[float] = []
    sourceSetName: str | None = None


def read_jsonl_gz(path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl_gz(path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def explorer(tiny_bundle):
    return Explorer.open(tiny_bundle.directory, device="cpu")


@pytest.fixture(scope="module")
def neuronpedia_dir(explorer, tmp_path_factory):
    out = tmp_path_factory.mktemp("neuronpedia")
    export_neuronpedia(explorer, out, progress=False)  # every feature: whole batches
    return out


@pytest.fixture(scope="module")
def circuit_tracer_dir(explorer, tmp_path_factory):
    out = tmp_path_factory.mktemp("circuit-tracer")
    export_circuit_tracer(explorer, out, FEATURES, scan="tiny-scan", progress=False)
    return out


def test_cantor_ids_are_circuit_tracers_and_name_the_files(circuit_tracer_dir):
    assert [cantor_id(Feature(l, i)) for l, i in [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (1, 13)]] == \
        [0, 1, 2, 3, 4, 118]
    ids = {cantor_id(Feature(l, i)) for l in range(30) for i in range(2048)}
    assert len(ids) == 30 * 2048  # one number per feature
    files = sorted(p.relative_to(circuit_tracer_dir).as_posix() for p in circuit_tracer_dir.rglob("*") if p.is_file())
    assert files == sorted(f"features/tiny-scan/{cantor_id(f)}.json" for f in FEATURES)


def test_circuit_tracer_files_validate_and_carry_the_dashboard(circuit_tracer_dir, explorer):
    maxima = explorer.maxima
    for feature in FEATURES:
        data = CTFeature.model_validate_json((circuit_tracer_dir / f"features/tiny-scan/{cantor_id(feature)}.json")
                                             .read_text())
        assert (data.transcoder_id, data.index) == ("tiny-scan", cantor_id(feature))
        assert data.act_max == maxima.dataset_max(feature) and data.act_min == 0
        assert len(data.top_logits) == len(data.bottom_logits) == 10
        if feature == Feature(0, 0):  # dead: nothing to show
            assert data.examples_quantiles == [] and data.histogram == [] and data.activation_frequency == 0
            continue
        groups = {q.quantile_name: q.examples for q in data.examples_quantiles}
        top = groups[TOP_GROUP]
        assert [e.train_token_ind for e in top] == [p for _, _, p in maxima.top_examples(feature)]
        for example, (stored, window, position) in zip(top, maxima.top_examples(feature)):
            ids = maxima.contexts([(stored, window, position)])[0][0]
            assert example.tokens == explorer.lm.tokenizer.convert_ids_to_tokens(ids)
            assert len(example.tokens) == len(example.tokens_acts_list) == maxima.windows.lengths[window]
            assert example.tokens_acts_list[position] == pytest.approx(stored, rel=1e-5)  # fp32 re-measured
        ranges = [name for name in groups if name.startswith("activations")]
        assert len(ranges) == len(maxima.interval_examples(feature)) > 0
        assert len(data.histogram) == 50 and sum(data.histogram) == pytest.approx(
            float(maxima.arrays["active_count"][feature.layer, feature.index]))
        assert len(data.quantile_values) == 100 and data.quantile_values == sorted(data.quantile_values)
        assert data.quantile_values[-1] <= data.act_max
        assert 0 < data.activation_frequency < 1


def test_cached_dreams_are_an_extra_group(tiny_bundle, tmp_path):
    bundle = Bundle.open(shutil.copytree(tiny_bundle.directory, tmp_path / "bundle"))
    explorer = Explorer(bundle, device="cpu")
    feature, template = Feature(1, 13), "the {prompt} on"
    dataset_max = explorer.dataset_max(feature)
    points = [dreamed_prompt(explorer.lm, explorer.transcoder, feature, prompt, template, dataset_max)
              for prompt in ("cat sat", "dog ran")]
    config = DreamConfig(template=template, prompt_length=2, dtype="float32")
    DreamCache(bundle.directory / "dreams").put(bundle.identity, dream_result(feature, config, dataset_max, points))
    export_circuit_tracer(explorer, tmp_path / "out", [feature], scan="s", progress=False)
    data = CTFeature.model_validate_json((tmp_path / f"out/features/s/{cantor_id(feature)}.json").read_text())
    assert data.examples_quantiles[-1].quantile_name == DREAMS_GROUP
    dreams = data.examples_quantiles[-1].examples
    assert sorted(max(d.tokens_acts_list[2:]) for d in dreams) == pytest.approx(sorted(p.activation for p in points))
    for dream in dreams:
        assert dream.tokens[:2] == ["<bos>", "the"] and dream.train_token_ind >= 2  # counted from the prompt on
        assert dream.tokens_acts_list[dream.train_token_ind] == max(dream.tokens_acts_list[2:])


def test_neuronpedia_batches_validate_with_the_exporters_columns(neuronpedia_dir, explorer):
    maxima = explorer.maxima
    sources = sorted(p.name for p in (neuronpedia_dir / "tiny-llama").iterdir())
    assert sources == ["0-dreaming", "1-dreaming", "2-dreaming"]
    for source in sources:
        layer = int(source.split("-")[0])
        neurons = read_jsonl_gz(neuronpedia_dir / "tiny-llama" / source / "features/batch-0.jsonl.gz")
        activations = read_jsonl_gz(neuronpedia_dir / "tiny-llama" / source / "activations/batch-0.jsonl.gz")
        assert [n["index"] for n in neurons] == [str(i) for i in range(24)]
        for record in neurons:
            assert tuple(record) == NEURON_COLUMNS
            NPFeature.model_validate(record)
            assert record["maxActApprox"] == maxima.dataset_max(Feature(layer, int(record["index"])))
        for record in activations:
            assert tuple(record) == ACTIVATION_COLUMNS
            NPActivation.model_validate(record)
            assert record["layer"] == source and record["dataSource"] in ("even", "odd")
            assert record["binMin"] == -1 or record["binMin"] <= record["maxValue"] <= record["binMax"]
        assert len({r["id"] for r in activations}) == len(activations)


def test_round_trip_export_import_gives_the_same_yardstick(neuronpedia_dir, explorer, tiny_bundle, tmp_path):
    original = explorer.maxima
    imported = import_neuronpedia(tiny_bundle, neuronpedia_dir, tmp_path / "maxima", progress=False)
    again = load_maxima(tmp_path / "maxima", identity=tiny_bundle.identity)
    assert torch.equal(again.arrays["max_activation"], original.arrays["max_activation"])
    assert torch.equal(again.arrays["density"], original.arrays["density"])
    for layer in range(3):
        for index in range(24):
            feature = Feature(layer, index)
            theirs, ours = original.top_examples(feature), again.top_examples(feature)
            assert [(v, p) for v, _, p in ours] == [(v, p) for v, _, p in theirs]
            assert [ids for ids, _ in again.contexts(ours)] == [ids for ids, _ in original.contexts(theirs)]
            assert [again.sources[again.windows.source[w]] for _, w, _ in ours] == \
                [original.sources[original.windows.source[w]] for _, w, _ in theirs]
    assert imported.metadata["imported"]["unknown"] == ["tokens", "active_count", "mean_active", "histogram",
                                                         "source_max"]
    assert torch.isnan(again.arrays["mean_active"]).all() and (again.arrays["active_count"] == -1).all()
    assert again.interval_examples(Feature(1, 13)) == []


def test_import_reads_display_text_and_adds_the_bos(tiny_bundle, tmp_path):
    record = {"layer": "1-x", "index": "13", "tokens": ["cat", "sat"], "maxValue": 1.25, "maxValueTokenIndex": 1,
              "values": [0.5, 1.25]}
    write_jsonl_gz(tmp_path / "export/1-x/activations/batch-0.jsonl.gz", [json.dumps(record)])
    maxima = import_neuronpedia(tiny_bundle, tmp_path / "export", tmp_path / "maxima", progress=False)
    assert maxima.top_examples(Feature(1, 13)) == [(1.25, 0, 2)]  # position shifted past the added BOS
    ids = maxima.contexts(maxima.top_examples(Feature(1, 13)))[0][0]
    assert Explorer(tiny_bundle, device="cpu").lm.tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "cat", "sat"]
    assert maxima.sources == ["neuronpedia"] and "density" in maxima.metadata["imported"]["unknown"]


def test_cli_export_and_import(tiny_bundle, tmp_path, capsys):
    bundle = shutil.copytree(tiny_bundle.directory, tmp_path / "bundle")
    main(["export", "--format", "neuronpedia", "--bundle", str(bundle), "--out", str(tmp_path / "np"),
          "--features", "1/13,2/5", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert (report["features"], report["files"]) == (2, 4) and report["bytes"] > 0
    with pytest.raises(SystemExit, match="already holds dataset maxima: pass --replace"):  # nothing lost by default
        main(["maxima", "import", "--bundle", str(bundle), "--from", str(tmp_path / "np"), "--json"])
    assert Bundle.open(bundle).maxima().dataset_max(Feature(1, 12)) == tiny_bundle.maxima().dataset_max(Feature(1, 12))
    main(["maxima", "import", "--bundle", str(bundle), "--from", str(tmp_path / "np"), "--replace", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["imported"]["features"] == 2 and report["directory"] == str(bundle / "maxima")
    maxima = Bundle.open(bundle).maxima()  # the bundle's own maxima now: checked against its identity
    assert maxima.dataset_max(Feature(1, 13)) == tiny_bundle.maxima().dataset_max(Feature(1, 13))
    assert maxima.dataset_max(Feature(1, 12)) == 0  # not exported
    assert Bundle.open(bundle).manifest["maxima"]["tokens"] == 0


def test_bad_input_gets_clear_errors(tiny_bundle, tmp_path):
    flags = ["--bundle", str(tiny_bundle.directory)]
    with pytest.raises(SystemExit, match="unknown feature 9/0: layer must be in 0..2"):
        main(["export", "--format", "circuit-tracer", "--out", str(tmp_path / "o"), "--features", "9/0", *flags])
    with pytest.raises(SystemExit, match="malformed feature id"):
        main(["export", "--format", "neuronpedia", "--out", str(tmp_path / "o"), "--features", "1-13", *flags])
    with pytest.raises(SystemExit, match="no Neuronpedia export at"):
        main(["maxima", "import", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "m"), *flags])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no Neuronpedia activation batches"):
        main(["maxima", "import", "--from", str(tmp_path / "empty"), "--out", str(tmp_path / "m"), *flags])

    good = {"layer": "1-x", "index": "13", "tokens": ["cat", "sat"], "maxValue": 1.0, "maxValueTokenIndex": 1}
    cases = {
        "line 2: not a Neuronpedia activations record": [json.dumps(good), "{not json"],
        "maxValueTokenIndex 5 is past the 2 tokens": [json.dumps({**good, "maxValueTokenIndex": 5})],
        "Field required": [json.dumps({k: v for k, v in good.items() if k != "tokens"})],
        "feature 1/99 .* is not in this bundle's transcoder": [json.dumps({**good, "index": "99"})],
        "does not start with its layer": [json.dumps({**good, "layer": "res-x"})],
        "both name layer 1": [json.dumps(good), json.dumps({**good, "layer": "1-y"})],
        "token 'zebra' is neither a token": [json.dumps({**good, "tokens": ["cat", "zebra"]})],
    }
    for i, (message, lines) in enumerate(cases.items()):
        write_jsonl_gz(tmp_path / f"bad{i}/1-x/activations/batch-0.jsonl.gz", lines)
        with pytest.raises(ValueError, match=message):
            import_neuronpedia(tiny_bundle, tmp_path / f"bad{i}", tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()  # nothing written on a failure

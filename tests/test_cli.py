"""The `dreaming` command on tiny models: train-clt end to end, info on a bundle, clear errors."""

import json

import pytest

from conftest import WORDS
from dreaming.bundle import Bundle, save_windows
from dreaming.cli import main
from dreaming.corpus import Document, write_documents

TINY_TRAINING = ["--features-per-layer", "32", "--k", "4", "--tokens", "600", "--batch-windows", "4",
                 "--buffer-windows", "8", "--heldout-windows", "4", "--refit-tokens", "100", "--window-length", "32"]


@pytest.fixture()
def model_dir(tiny_lm, tmp_path):
    directory = tmp_path / "tiny-model"
    tiny_lm.model.save_pretrained(directory)
    tiny_lm.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture()
def corpus_file(tmp_path):
    documents = [Document(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(60)), f"source-{i % 3}") for i in range(40)]
    path = tmp_path / "corpus.jsonl"
    write_documents(documents, path)
    return path


def test_train_clt_end_to_end(model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train-clt", "--model", str(model_dir), "--corpus", str(corpus_file), "--out", str(out), "--json",
          "--reach", "none", *TINY_TRAINING])
    report = json.loads(capsys.readouterr().out)
    assert len(report["fvu"]) == 3 and report["tokens"] > 0
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "clt" / "W_dec_0.safetensors").exists() and (out / "clt" / "config.yaml").exists()


def test_train_clt_errors_name_the_problem(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such file|does not exist|not found"):
        main(["train-clt", "--model", str(model_dir), "--corpus", str(tmp_path / "missing.jsonl"),
              "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="k .* cannot exceed"):
        main(["train-clt", "--model", str(model_dir), "--corpus", str(tmp_path), "--out", str(tmp_path / "run"),
              "--features-per-layer", "4", "--k", "8"])
    with pytest.raises(SystemExit):
        main(["train-clt", "--out", str(tmp_path / "run"), "--k", "many"])
    assert not (tmp_path / "run" / "clt").exists()


def test_info_reports_a_bundle(model_dir, corpus_file, tmp_path, capsys):
    from conftest import random_windows

    main(["train-clt", "--model", str(model_dir), "--corpus", str(corpus_file), "--out", str(tmp_path / "run"),
          *TINY_TRAINING])
    capsys.readouterr()
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    (tmp_path / "run" / "clt").rename(bundle_dir / "clt")
    save_windows(random_windows(6, 16, 30), bundle_dir / "windows")
    bundle = Bundle(bundle_dir, {"model": str(model_dir), "model_name": "tiny", "corpus": {"tokens": {"a": 10}, "documents": {"a": 1}},
                                 "windows": {"count": 6, "window_length": 16, "tokens": 96}, "build_seconds": {"clt": 1.0}})
    bundle.save_manifest()
    main(["info", "--bundle", str(bundle_dir), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["transcoder"]["kind"] == "cross_layer_transcoder"
    assert info["transcoder"]["features"] == 3 * 32 and info["maxima"] is None
    main(["info", "--bundle", str(bundle_dir)])
    assert "3 layers × 32 features" in capsys.readouterr().out
    assert len(Bundle.open(bundle_dir).windows()) == 6
    with pytest.raises(SystemExit, match="is not a bundle"):
        main(["info", "--bundle", str(tmp_path)])


@pytest.fixture()
def tiny_bundle_dir(tiny_lm, tmp_path):
    from conftest import make_tiny_transcoder, random_windows
    from tiny_bundle import build_tiny_bundle

    windows = random_windows(12, 16, len(tiny_lm.tokenizer))
    return build_tiny_bundle(tmp_path / "bundle", tiny_lm, make_tiny_transcoder(tiny_lm), windows).directory


def run_json(capsys, *argv):
    capsys.readouterr()
    main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


def test_maxima_build_from_a_corpus_updates_the_bundle(tiny_bundle_dir, corpus_file, capsys):
    report = run_json(capsys, "maxima", "build", "--bundle", str(tiny_bundle_dir), "--corpus", str(corpus_file),
                      "--window-length", "32", "--top-k", "3")
    assert report["features"] == 3 * 24 and report["tokens"] > 0 and report["dead"] >= 1
    info = run_json(capsys, "info", "--bundle", str(tiny_bundle_dir))
    assert info["maxima"]["tokens"] == report["tokens"]
    assert Bundle.open(tiny_bundle_dir).maxima().sources == ["source-0", "source-1", "source-2"]


def test_activation_search_compare(tiny_bundle_dir, capsys):
    bundle = ["--bundle", str(tiny_bundle_dir)]
    (measured,) = run_json(capsys, "activation", *bundle, "--feature", "1/3", "--text", "the cat sat on the mat")
    assert set(measured) >= {"text", "token_ids", "token_activations", "activation", "fraction_of_max"}
    found = run_json(capsys, "search", *bundle, "--text", "the cat sat on the mat", "--top", "5")
    assert 0 < len(found) <= 5
    page = run_json(capsys, "compare", *bundle, "--feature", found[0]["feature"])
    assert page["examples"] and page["dreams"] == []
    main(["compare", *bundle, "--feature", found[0]["feature"]])
    assert "[[" in capsys.readouterr().out
    main(["activation", *bundle, "--feature", "1/3", "--text", "the cat", "--text", "a dog"])
    assert "of dataset max" in capsys.readouterr().out


def test_bad_feature_ids_and_texts_get_clear_errors(tiny_bundle_dir):
    bundle = ["--bundle", str(tiny_bundle_dir)]
    with pytest.raises(SystemExit, match="malformed feature id"):
        main(["activation", *bundle, "--feature", "12-3", "--text", "the cat"])
    with pytest.raises(SystemExit, match=r"layer must be in 0\.\.2"):
        main(["compare", *bundle, "--feature", "7/1"])
    with pytest.raises(SystemExit, match=r"index must be in 0\.\.23"):
        main(["activation", *bundle, "--feature", "1/99", "--text", "the cat"])
    with pytest.raises(SystemExit, match="empty text"):
        main(["activation", *bundle, "--feature", "1/3", "--text", " "])
    with pytest.raises(SystemExit, match="empty text"):
        main(["search", *bundle, "--text", ""])

"""The `dreaming` command on tiny models: train-transcoder end to end, info on a bundle, clear errors."""

import json

import pytest

from conftest import WORDS
from dreaming.build.corpus import Document, write_documents
from dreaming.bundle import Bundle
from dreaming.cli import main
from dreaming.engine.length import FALLBACK_LENGTH
from dreaming.windows import save_windows

TINY_TRAINING = ["--recipe", "closed-form", "--features-per-layer", "32", "--k", "4", "--fit-tokens", "600",
                 "--batch-windows", "4", "--heldout-windows", "4", "--kmeans-iterations", "3", "--window-length", "32"]
TINY_CLT = ["--features-per-layer", "16", "--k", "3", "--tokens", "384", "--batch-tokens", "128", "--buffer-tokens",
            "256", "--init-tokens", "64", "--init-k", "3", "--batch-windows", "4", "--heldout-windows", "4",
            "--window-length", "32"]


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


def test_train_transcoder_end_to_end(model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train-transcoder", "--model", str(model_dir), "--corpus", str(corpus_file), "--out", str(out), "--json",
          *TINY_TRAINING])
    report = json.loads(capsys.readouterr().out)
    texts, windows = report["varied_texts"], report["heldout_windows"]
    assert len(texts["fvu"]) == len(windows["fvu"]) == len(texts["spliced_cross_entropy"]) == 3
    assert len(windows["spliced_cross_entropy"]) == len(windows["spliced_kl"]) == len(windows["dense_fraction"]) == 3
    assert texts["replacement_kl"] > 0 and sum(texts["log10_density_counts"]) > 0
    assert texts["sequences"] >= 50 and windows["sequences"] == 4 and windows["tokens"] > 0
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "transcoder" / "layer_0.safetensors").exists() and (out / "transcoder" / "config.yaml").exists()
    main(["train-transcoder", "--model", str(model_dir), "--corpus", str(corpus_file), "--out", str(out),
          *TINY_TRAINING])
    table = capsys.readouterr().out
    assert "CE, layer spliced" in table and "CE, every MLP replaced" in table and "KL(model ‖ replacement)" in table
    assert "dense features" in table and "decades spanned" in table and "live features per 0.5 decade" in table


def test_train_transcoder_trains_a_clt_by_default(model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train-transcoder", "--model", str(model_dir), "--corpus", str(corpus_file), "--out", str(out), "--json",
          *TINY_CLT])
    report = json.loads(capsys.readouterr().out)
    assert json.loads((out / "report.json").read_text()) == report and report["recipe"] == "clt"
    assert len(report["varied_texts"]["fvu"]) == len(report["heldout_windows"]["spliced_kl"]) == 3
    assert sorted(p.name for p in (out / "transcoder").glob("W_*_0.safetensors")) == ["W_dec_0.safetensors",
                                                                                   "W_enc_0.safetensors"]
    from dreaming.formats import read_config
    config = read_config(out / "transcoder")
    assert (config.kind, config.activation, config.d_transcoder, config.skip_connection) == (
        "cross_layer_transcoder", "jumprelu", 16, True)


def test_train_transcoder_errors_name_the_problem(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--fit-tokens is not an option of the clt recipe"):
        main(["train-transcoder", "--model", str(model_dir), "--out", str(tmp_path / "run"), "--fit-tokens", "600"])
    with pytest.raises(SystemExit, match="--tokens is not an option of the closed-form recipe"):
        main(["train-transcoder", "--recipe", "closed-form", "--out", str(tmp_path / "run"), "--tokens", "600"])
    with pytest.raises(SystemExit):
        main(["train-transcoder", "--out", str(tmp_path / "run"), "--skip", "maybe"])
    with pytest.raises(SystemExit, match="no such file|does not exist|not found"):
        main(["train-clt", "--model", str(model_dir), "--corpus", str(tmp_path / "missing.jsonl"),
              "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="k .* cannot exceed"):
        main(["train-clt", "--model", str(model_dir), "--corpus", str(tmp_path), "--out", str(tmp_path / "run"),
              "--features-per-layer", "4", "--k", "8"])
    with pytest.raises(SystemExit):
        main(["train-clt", "--out", str(tmp_path / "run"), "--k", "many"])
    assert not (tmp_path / "run" / "transcoder").exists()


def test_info_reports_a_bundle(model_dir, corpus_file, tmp_path, capsys):
    from conftest import random_windows

    main(["train-clt", "--model", str(model_dir), "--corpus", str(corpus_file), "--out", str(tmp_path / "run"),
          *TINY_TRAINING])  # the old name still works
    capsys.readouterr()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report.pop("recipe") == "closed-form"
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    (tmp_path / "run" / "transcoder").rename(bundle_dir / "transcoder")
    save_windows(random_windows(6, 16, 30), bundle_dir / "windows")
    bundle = Bundle(bundle_dir, {"model": str(model_dir), "model_name": "tiny", "corpus": {"tokens": {"a": 10}, "documents": {"a": 1}},
                                 "windows": {"count": 6, "window_length": 16, "tokens": 96}, "build_seconds": {"transcoder": 1.0},
                                 "recipe": "closed-form", "transcoder_report": report})
    bundle.save_manifest()
    main(["info", "--bundle", str(bundle_dir), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["transcoder"]["kind"] == "transcoder_set" and info["transcoder"]["recipe"] == "closed-form"
    assert len(info["transcoder"]["evaluation"]["varied_texts"]["fvu"]) == 3
    assert info["transcoder"]["features"] == 3 * 32 and info["maxima"] is None
    main(["info", "--bundle", str(bundle_dir)])
    text = capsys.readouterr().out
    assert "3 layers × 32 features" in text and "varied texts" in text and "one layer spliced at a time, KL" in text
    # a manifest from before KL, densities and splicing on the windows: info prints what is there
    old_keys = {"sequences", "tokens", "fvu", "l0", "dead_fraction", "mean_fvu", "max_fvu", "mean_l0",
                "mean_dead_fraction", "cross_entropy", "replacement_cross_entropy", "spliced_cross_entropy"}
    bundle.manifest["transcoder_report"] = {name: {key: value for key, value in report.items() if key in old_keys}
                                            for name, report in bundle.manifest["transcoder_report"].items()}
    bundle.manifest["transcoder_report"]["heldout_windows"].pop("spliced_cross_entropy")
    bundle.save_manifest()
    main(["info", "--bundle", str(bundle_dir)])
    text = capsys.readouterr().out
    assert "one layer spliced at a time, CE" in text and "dead features" in text and "KL" not in text
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


def test_activation_inside_a_template(tiny_bundle_dir, capsys):
    from dreaming.activation import measure_texts
    from dreaming.explorer import Explorer

    bundle = ["--bundle", str(tiny_bundle_dir), "--feature", "1/13"]
    template = "the cat {prompt} on the mat"
    (measured,) = run_json(capsys, "activation", *bundle, "--text", "dog ran", "--template", template)
    assert measured["text"] == "the cat dog ran on the mat" and measured["counted_from"] == 3
    assert measured["activation"] == max(measured["token_activations"][3:])
    assert measured["template_activation"] == max(measured["token_activations"][1:3])
    explorer = Explorer.open(tiny_bundle_dir, device="cpu")
    (whole,) = measure_texts(explorer.lm, explorer.transcoder, explorer.feature("1/13"), [measured["text"]])
    assert whole.token_activations == measured["token_activations"]  # the same text, counted from the prompt on
    main(["activation", *bundle, "--text", "dog ran", "--template", template])
    text = capsys.readouterr().out
    assert "the prompt and what follows it" in text and "template's own prefix" in text and "(template)" in text
    with pytest.raises(SystemExit, match=r"exactly one '\{prompt\}'"):
        main(["activation", *bundle, "--text", "dog", "--template", "the cat"])
    with pytest.raises(SystemExit, match="merges with the template"):
        main(["activation", *bundle, "--text", "t sat", "--template", "the ca{prompt}"])
    with pytest.raises(SystemExit, match="no chat template"):
        main(["activation", *bundle, "--text", "dog", "--template", "chat"])


def test_compare_shows_length_matched_examples(tiny_bundle_dir, capsys):
    bundle = ["--bundle", str(tiny_bundle_dir), "--feature", "1/13", "--top", "3"]
    page = run_json(capsys, "compare", *bundle, "--length", "5")
    assert page["length"] == 5 and all(e["length_matched"]["tokens"] <= 5 for e in page["examples"])
    assert page["dreams"] == page["diverse"] == page["stale_dreams"] == []
    # without dreams, the length a dream of a feature without maxima gets (with them: its best dream's)
    assert run_json(capsys, "compare", *bundle)["length"] == FALLBACK_LENGTH
    main(["compare", *bundle, "--length", "5"])
    text = capsys.readouterr().out
    assert "cut to 5 tok: % of max" in text and "CE" in text
    first = page["examples"][0]["length_matched"]
    assert f"{first['cross_entropy']:5.2f}" in text


def test_print_dream_shows_origin_novelty_and_the_diverse_set(tiny_bundle_dir, capsys):
    from dream_results import dream_result, dreamed_prompt

    from dreaming.cli import print_dream
    from dreaming.engine import DreamConfig
    from dreaming.explorer import Explorer
    from dreaming.features import Feature

    explorer, feature, template = Explorer.open(tiny_bundle_dir, device="cpu"), Feature(1, 13), "the {prompt} on"
    dataset_max = explorer.dataset_max(feature)
    a = dreamed_prompt(explorer.lm, explorer.transcoder, feature, "cat sat", template, dataset_max, 3.0, "dataset #2", 7)
    b = dreamed_prompt(explorer.lm, explorer.transcoder, feature, "dog ran", template, dataset_max, 6.0, "random", None)
    result = dream_result(feature, DreamConfig(template=template, prompt_length=2), dataset_max, [a, b], diverse=[a])
    capsys.readouterr()
    print_dream(result)
    text = capsys.readouterr().out
    assert "origin" in text and "shared" in text and "diverse (1 fluent" in text
    row_a = next(line for line in text.splitlines() if "'cat sat' *" in line)
    assert "dataset #2" in row_a and " 7 " in row_a
    row_b = next(line for line in text.splitlines() if "'dog ran'" in line)
    assert "random" in row_b and " - " in row_b
    assert text.split("diverse (")[1].count("'cat sat'") == 1 and "'dog ran'" not in text.split("diverse (")[1]

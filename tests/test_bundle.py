"""The default bundle's directory: an earlier recipe's bundle is set aside, never reused step by step."""

import json

from dreaming.build.default import current_default_manifest
from dreaming.bundle import DEFAULT_BUNDLE_VERSION, MANIFEST


def test_an_earlier_default_bundle_is_moved_aside_untouched(tmp_path):
    directory = tmp_path / "default"
    directory.mkdir()
    (directory / MANIFEST).write_text(json.dumps({"model": "default", "clt_report": {}}))  # version 1 had no field
    (directory / "corpus.jsonl").write_text("old corpus")
    assert current_default_manifest(directory) == {}
    assert not (directory / "corpus.jsonl").exists() and directory.is_dir()
    assert (tmp_path / "default.v1" / "corpus.jsonl").read_text() == "old corpus"
    (directory / MANIFEST).write_text(json.dumps({"version": 1}))
    current_default_manifest(directory)  # a second earlier bundle does not overwrite the first
    assert (tmp_path / "default.v1-1" / MANIFEST).exists() and (tmp_path / "default.v1" / "corpus.jsonl").exists()


def test_a_current_default_bundle_is_kept(tmp_path):
    manifest = {"version": DEFAULT_BUNDLE_VERSION, "model": "default", "build_seconds": {"model": 1.0}}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert current_default_manifest(tmp_path) == manifest
    assert current_default_manifest(tmp_path / "missing") == {}


def test_changing_an_encoder_tensor_changes_the_bundle_identity_and_refuses_its_maxima(tmp_path):
    """A threshold, encoder weight or bias edited in place gives the bundle another identity, so its maxima (and
    the dreams cached under the old identity) are not used; the decoders, which no measurement reads, do not."""
    import pytest
    import torch
    from safetensors.torch import save_file

    from dreaming.bundle import Bundle
    from dreaming.formats import load_transcoder
    from dreaming.formats.circuit_tracer import save_transcoder
    from dreaming.maxima import FORMAT_VERSION
    from dreaming.transcoders import CLT, Transcoder, TranscoderConfig
    directory = tmp_path / "bundle"
    save_transcoder(Transcoder(TranscoderConfig(CLT, 2, 8, 16, activation="jumprelu")), directory / "transcoder")
    (directory / MANIFEST).write_text(json.dumps({"model": "m", "model_name": "m"}))
    first = Bundle.open(directory).identity
    assert Bundle.open(directory).identity == first
    (directory / "maxima").mkdir()
    save_file({"max_activation": torch.zeros(2, 16)}, str(directory / "maxima" / "maxima.safetensors"),
              metadata={"dreaming": json.dumps({"format_version": FORMAT_VERSION, "identity": first})})
    for name, changes_identity in (("threshold", True), ("W_enc", True), ("b_enc", True), ("W_dec", False)):
        transcoder = load_transcoder(directory / "transcoder")
        with torch.no_grad():
            getattr(transcoder, name)[1].add_(0.25)
        save_transcoder(transcoder, directory / "transcoder")
        identity = Bundle.open(directory).identity
        assert (identity != first) == changes_identity, name
        if changes_identity:
            with pytest.raises(ValueError, match="built for another model/transcoder"):
                Bundle.open(directory).maxima()
        first = identity


def test_opening_the_default_bundle_never_builds_it(tmp_path, monkeypatch, capsys):
    """Missing, unfinished or of an earlier recipe: a one-line error naming `dreaming default build`, nothing
    written; the CLI says the same."""
    import pytest

    from dreaming.bundle import Bundle
    from dreaming.cli import main

    monkeypatch.setenv("DREAMING_HOME", str(tmp_path))
    monkeypatch.delenv("DREAMING_BUNDLE", raising=False)
    with pytest.raises(FileNotFoundError, match=r"is not built: run `dreaming default build`"):
        Bundle.open()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "default").mkdir()
    for manifest, state in [({"version": DEFAULT_BUNDLE_VERSION}, "is unfinished"),
                            ({"version": 1, "maxima": {}}, r"is of an earlier recipe \(version 1\)")]:
        (tmp_path / "default" / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(FileNotFoundError, match=state):
            Bundle.open()
    with pytest.raises(SystemExit, match="dreaming default build"):
        main(["info"])
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == [MANIFEST]


def test_a_default_bundle_built_before_identities_were_recorded_keeps_its_maxima(tmp_path, monkeypatch):
    """A finished default bundle whose manifest records no identity (built before bundles recorded one) is refused
    with a one-line error naming `dreaming default build`; that build runs only the identity step, which records
    the identity its maxima (and cached dreams) were keyed by, so they stay in use."""
    import numpy as np
    import pytest
    import torch
    from safetensors.torch import save_file

    from dreaming.build.default import build_default_bundle
    from dreaming.bundle import Bundle
    from dreaming.formats.circuit_tracer import save_transcoder
    from dreaming.maxima import FORMAT_VERSION
    from dreaming.models import default_model_dir
    from dreaming.transcoders import CLT, Transcoder, TranscoderConfig
    from dreaming.windows import Windows, save_windows

    monkeypatch.setenv("DREAMING_HOME", str(tmp_path))
    directory = tmp_path / "default"
    save_transcoder(Transcoder(TranscoderConfig(CLT, 2, 8, 16, activation="jumprelu")), directory / "transcoder")
    (directory / "windows").mkdir()
    (directory / "corpus.jsonl").write_text("")
    save_windows(Windows(np.zeros((1, 4), np.int32), np.full(1, 4, np.int32), np.zeros(1, np.int32),
                         np.zeros(1, np.int16), ["text"]), directory / "maxima" / "windows")
    save_file({"max_activation": torch.zeros(2, 16)}, str(directory / "maxima" / "maxima.safetensors"),
              metadata={"dreaming": json.dumps({"format_version": FORMAT_VERSION, "identity": "keyed-before"})})
    default_model_dir().mkdir(parents=True)
    (default_model_dir() / "model.safetensors").write_text("")  # the model step is done
    manifest = {"version": DEFAULT_BUNDLE_VERSION, "model": "default", "model_name": "m", "corpus": {},
                "transcoder_report": {}, "maxima": {}, "build_seconds": {}}
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="before bundles recorded their identity: run `dreaming default build`"):
        Bundle.open()
    build_default_bundle(progress=False)
    bundle = Bundle.open()
    assert bundle.identity == "keyed-before" and bundle.maxima() is not None
    assert set(bundle.manifest["build_seconds"]) == {"identity"}  # nothing else was built again

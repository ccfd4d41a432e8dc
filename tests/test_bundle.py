"""The default bundle's directory: an earlier recipe's bundle is set aside, never reused step by step."""

import json

from dreaming.bundle import DEFAULT_BUNDLE_VERSION, MANIFEST, current_default_manifest


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

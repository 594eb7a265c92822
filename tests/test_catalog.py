import json

import pytest

from jtc_lens.harness import cli
from jtc_lens.harness.corpora import catalog, pins

pytestmark = pytest.mark.realdata  # verifies and lists the installed corpus packages


def test_verify_accepts_pinned_sources_and_rejects_changed_ones(monkeypatch, tmp_path):
    ok, message = catalog.verify("news")
    assert ok, message
    manifest = json.loads(pins.MANIFEST.read_text())
    manifest["news"] = "0" * 64
    fake = tmp_path / "manifest.json"
    fake.write_text(json.dumps(manifest))
    monkeypatch.setattr(pins, "MANIFEST", fake)
    ok, message = catalog.verify("news")
    assert not ok and "differs from the pinned" in message
    assert cli.main(["corpora", "verify", "news"]) == 1


def test_verify_names_the_files_that_differ(monkeypatch, tmp_path):
    """As if two files of the installed package had been edited and one added since the pin."""
    manifest = json.loads(pins.MANIFEST.read_text())
    manifest["news"] = "0" * 64
    files = json.loads(pins.FILE_MANIFEST.read_text())
    news = dict(files["news"])
    news["bbcnews/data/business/001.txt"] = "0" * 16
    news["bbcnews/data/tech/010.txt"] = "0" * 16
    del news["bbcnews/data/sports/100.txt"]
    files["news"] = news
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    (tmp_path / "f.json").write_text(json.dumps(files))
    monkeypatch.setattr(pins, "MANIFEST", tmp_path / "m.json")
    monkeypatch.setattr(pins, "FILE_MANIFEST", tmp_path / "f.json")
    ok, message = catalog.verify("news")
    assert not ok
    assert "2 changed: bbcnews/data/business/001.txt, bbcnews/data/tech/010.txt" in message
    assert "1 added: bbcnews/data/sports/100.txt" in message and "missing" not in message


def test_list_reports_sizes_and_hashes(capsys):
    row = catalog.describe("wikipedia")
    assert row["documents"] > 100 and row["words"] > 400_000 and row["source_files"] == 1
    assert row["sentences_train"] > row["sentences_validation"] > 0
    assert cli.main(["corpora", "list", "wikipedia", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| distribution |") and row["sources_sha256"] in out

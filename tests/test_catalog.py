import json

from harness import cli
from harness.corpora import catalog


def test_verify_accepts_pinned_sources_and_rejects_changed_ones(monkeypatch, tmp_path):
    ok, message = catalog.verify("news")
    assert ok, message
    manifest = json.loads(catalog.MANIFEST.read_text())
    manifest["news"] = "0" * 64
    fake = tmp_path / "manifest.json"
    fake.write_text(json.dumps(manifest))
    monkeypatch.setattr(catalog, "MANIFEST", fake)
    ok, message = catalog.verify("news")
    assert not ok and "differs from the pinned" in message
    assert cli.main(["corpora", "verify", "news"]) == 1


def test_list_reports_sizes_and_hashes(capsys):
    row = catalog.describe("wikipedia")
    assert row["documents"] > 100 and row["words"] > 400_000 and row["source_files"] == 1
    assert row["sentences_train"] > row["sentences_validation"] > 0
    assert cli.main(["corpora", "list", "wikipedia", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| distribution |") and row["sources_sha256"] in out

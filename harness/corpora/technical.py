"""Technical prose: the Python 3.11 documentation, from the reStructuredText sources Debian ships.

The Debian package python3.11-doc installs the HTML documentation with its sources as
``html/_sources/**/*.rst.txt``; each source file becomes one document (the ``includes/`` snippets,
which are pasted into other pages, are left out). The markup is reduced to the prose a reader of
the rendered page sees, one paragraph per line:

* code (literal blocks after ``::``, doctest blocks, ``code-block``/``literalinclude``/``doctest``
  and similar directives), tables, tables of contents, index entries, comments, link targets,
  ``seealso`` boxes (mostly lists of links) and directive options are dropped;
* the signature line of an API description (``.. function:: open(file, ...)``) is dropped and its
  description kept; notes and warnings keep their text; version notes read as Sphinx renders them
  ("Changed in version 3.3: ...");
* section titles stay as their own line, their underlines go;
* inline markup is reduced to its text: ``:func:`open``` -> ``open()`` (Sphinx adds the
  parentheses), ``:pep:`8``` -> ``PEP 8``, ````literal```` -> ``literal``, ```text <url>`_`` ->
  ``text``, ``:ref:`label``` -> the title of the section the label marks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .base import Corpus, Document, MissingSourceError, cached_documents, hash_files

DEBIAN_PACKAGE = "python3.11-doc"
INSTALL_LINE = f"apt-get install {DEBIAN_PACKAGE}"
SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
DPKG_STATUS = Path("/var/lib/dpkg/status")
DOC_VERSION = "3.11"
LOADER_VERSION = "technical-1"
_EXCLUDED_DIRS = frozenset({"includes"})

# Directives dropped with their whole body: code, tables, navigation, metadata, link lists.
_DROP = frozenset("""
    code-block sourcecode code doctest testcode testsetup testcleanup testoutput literalinclude
    toctree index highlight highlightlang productionlist tabularcolumns include image figure
    list-table table csv-table contents sectionauthor moduleauthor module currentmodule
    audit-event-table limited-api-list miscnews parsed-literal availability audit-event seealso
    rubric program raw math graphviz default-role role c:namespace c:namespace-push c:namespace-pop
    py:module py:currentmodule
""".split())
# API descriptions: the signature (and its continuation lines and options) goes, the text stays.
_DESCRIPTION = frozenset("""
    function method class attribute data exception decorator decoratormethod classmethod staticmethod
    abstractmethod coroutinefunction coroutinemethod awaitablefunction awaitablemethod property
    py:function py:method py:class py:attribute py:data py:exception
    c:function c:member c:type c:var c:macro c:struct c:union c:enum c:enumerator c:data c:alias
    cmdoption option envvar describe object opcode pdbcommand 2to3fixer fixer monitoring-event
""".split())
# Boxes whose text is read: the argument, if any, is their first words (or a title).
_BOX = frozenset("""
    note warning important caution attention hint tip danger error impl-detail admonition topic
    sidebar epigraph glossary only centered hlist container compound highlights pull-quote
""".split())
_VERSION = {
    "versionadded": "New in version {v}",
    "versionchanged": "Changed in version {v}",
    "deprecated": "Deprecated since version {v}",
    "deprecated-removed": "Deprecated since version {v}, will be removed in version {w}",
}

_EXPLICIT = re.compile(r"^\.\.(\s+|$)")
_DIRECTIVE = re.compile(r"^\.\.\s+([\w:.+-]+)::(?:\s+(.*))?$")
_TARGET = re.compile(r"^\.\.\s+(_[^:]*|__)(:|$)")
_SUBSTITUTION = re.compile(r"^\.\.\s+\|([^|]+)\|\s+([\w:-]+)::\s*(.*)$")
_FOOTNOTE = re.compile(r"^\.\.\s+\[([^\]]+)\]\s*(.*)$")
_ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1{2,}$")
_GRID_BORDER = re.compile(r"^\+[-=+]+\+$")
_SIMPLE_BORDER = re.compile(r"^=+( +=+)+$")
_BULLET = re.compile(r"^([-*+\u2022]|\d+[.)]|#[.)]|\(\d+\)|\(#\))\s+(.*)$")
_FIELD = re.compile(r"^:([^:`]+):(\s+.*)?$")
_OPTION = re.compile(r"^:[\w-]+:")
_LABEL_NAME = re.compile(r"^\.\.\s+_([^:]+):\s*$")

# Inline markup, scanned left to right in one pass so that literals are never reinterpreted.
_INLINE = re.compile(
    r"(?P<literal>``(?P<lit>.+?)``(?!`))"
    r"|(?P<escape>\\(?P<esc>.))"
    r"|(?P<role>(?::(?P<rname>[\w.+:-]+):)?_?`(?P<content>(?:[^`\\]|\\.)+)`(?P<link>__?)?(?::(?P<rsuffix>[\w.+:-]+):)?)"
    r"|(?P<sub>\|(?P<sname>[^|\s](?:[^|]*[^|\s])?)\|(?:__?)?)"
    r"|(?P<footref>\s?\[(?:#[\w-]*|\d+|\*)\]_)"
    r"|(?P<citation>\[[A-Za-z][\w.-]*\]_)"
    r"|(?P<strong>\*\*(?P<stext>[^*\s](?:.*?[^*\s])?)\*\*)"
    r"|(?P<emph>(?<![\w*])\*(?P<etext>(?:[^*\s\\]|\\.)(?:(?:[^*\\]|\\.)*?(?:[^*\s\\]|\\.))?)\*(?![\w*]))"
    r"|(?P<named>(?<![\w`/.-])(?P<nname>[A-Za-z][\w-]*[A-Za-z0-9])__?(?=[\s.,;:!?)'\"]|$))",
    re.DOTALL,
)
# A list item that is nothing but one cross-reference or link: lists of links are not prose.
_LINK_ONLY = re.compile(r"^(?::[\w.+:-]+:)?`[^`]+`(?:__?)?[.,;]?$")
_TITLED = re.compile(r"^(.*?)\s*<([^<>]+)>$", re.DOTALL)
_CALLABLE_ROLES = frozenset({"func", "meth", "c:func", "py:func", "py:meth"})


@dataclass
class _Context:
    labels: dict[str, str] = field(default_factory=dict)  # reference label -> raw section title
    doc_titles: dict[str, str] = field(default_factory=dict)  # "library/os" -> raw page title
    substitutions: dict[str, str] = field(default_factory=dict)
    doc: str = ""  # the page being rendered, for relative :doc: links
    depth: int = 0


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the block that starts at ``start``: blank lines and lines indented past ``indent``."""
    j = start
    last = start
    while j < len(lines):
        if lines[j].strip():
            if _indent(lines[j]) <= indent:
                break
            last = j + 1
        j += 1
    return last


def _dedent(lines: list[str]) -> list[str]:
    widths = [_indent(ln) for ln in lines if ln.strip()]
    cut = min(widths) if widths else 0
    return [ln[cut:] if ln.strip() else "" for ln in lines]


# --- inline markup ---------------------------------------------------------------------------

def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text.replace("\\ ", ""))


def _role_text(role: str, content: str, link: bool, ctx: _Context) -> str:
    role = role.removeprefix("py:") if role.startswith("py:") and role[3:] in {"func", "meth", "class"} else role
    titled = _TITLED.match(content)
    if titled and (link or role in {"", "ref", "doc", "term", "any", "pep", "rfc", "keyword", "class", "func", "meth",
                                     "mod", "exc", "attr", "data", "const", "obj", "envvar", "option", "token"}
                   or role.startswith("c:")):
        return _unescape(titled.group(1)) if titled.group(1).strip() else _unescape(titled.group(2))
    text = _unescape(content)
    if link or role in {"", "dfn", "term", "kbd", "command", "program", "file", "mailheader", "mimetype",
                        "makevar", "envvar", "code", "regexp", "newsgroup", "sup", "sub", "math", "guilabel",
                        "menuselection", "manpage", "source", "opcode", "pdbcmd", "token", "bdg"}:
        if role == "menuselection":
            text = text.replace("-->", ">")
        return text
    if role == "samp":
        return re.sub(r"\{([^}]*)\}", r"\1", text)
    if role == "abbr":
        return re.sub(r"\s*\(.*\)\s*$", "", text, flags=re.DOTALL)
    if role == "pep":
        return "PEP " + text.split("#", 1)[0]
    if role == "rfc":
        return "RFC " + text.split("#", 1)[0]
    if role == "issue":
        return "bpo-" + text
    if role == "gh":
        return "gh-" + text
    if role in {"ref", "numref"}:
        title = ctx.labels.get(text.lower())
        return _inline(title, ctx) if title and ctx.depth < 3 else text
    if role == "doc":
        path = text.lstrip("/") if text.startswith("/") else str(Path(ctx.doc).parent / text)
        path = re.sub(r"(^|/)\./", r"\1", path)
        title = ctx.doc_titles.get(path) or ctx.doc_titles.get(text)
        return _inline(title, ctx) if title and ctx.depth < 3 else Path(text).name
    # Cross-references to Python and C objects.
    if text.startswith("!"):
        text = text[1:]
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    text = text.lstrip(".")
    if role in _CALLABLE_ROLES and not text.endswith(")"):
        text += "()"
    return text


def _inline(text: str, ctx: _Context) -> str:
    ctx.depth += 1
    try:
        def replace(m: re.Match) -> str:
            if m.group("literal"):
                return m.group("lit")
            if m.group("escape") is not None:
                return "" if m.group("esc").isspace() else m.group("esc")
            if m.group("role"):
                role = m.group("rname") or m.group("rsuffix") or ""
                return _role_text(role, m.group("content"), bool(m.group("link")), ctx)
            if m.group("sub"):
                name = m.group("sname")
                if name in ctx.substitutions:
                    return _inline(ctx.substitutions[name], ctx) if ctx.depth < 3 else ctx.substitutions[name]
                return {"release": DOC_VERSION, "version": DOC_VERSION, "today": ""}.get(name, name)
            if m.group("footref") is not None or m.group("citation"):
                return ""
            if m.group("strong"):
                return _inline(m.group("stext"), ctx)
            if m.group("emph"):
                return _inline(m.group("etext"), ctx)
            return m.group("nname")  # a named hyperlink reference: "PyPI_"

        out = _INLINE.sub(replace, text)
    finally:
        ctx.depth -= 1
    return out


def _finish(paragraph: str, ctx: _Context) -> str:
    text = " ".join(paragraph.split())
    if text == "::":
        return ""
    if text.endswith(" ::"):
        text = text[:-3]
    elif text.endswith("::"):
        text = text[:-1]
    text = " ".join(_inline(text, ctx).split())
    text = re.sub(r"(?<=\s)---(?=\s)", "\u2014", text)
    return text if any(c.isalpha() for c in text) else ""


# --- blocks ----------------------------------------------------------------------------------

def _render(lines: list[str], ctx: _Context) -> list[str]:
    """Paragraphs (inline markup resolved) of a run of reST lines."""
    out: list[str] = []
    cur: list[str] = []
    cur_indent = -1
    cur_item = False
    literal_after = None  # indentation of a paragraph that announced a literal block ("::")

    def flush():
        nonlocal cur, cur_item, literal_after
        if cur:
            raw = " ".join(cur)
            if raw.rstrip().endswith("::"):
                literal_after = cur_indent
            text = "" if cur_item and _LINK_ONLY.match(raw.strip()) else _finish(raw, ctx)
            if text:
                out.append(text)
        cur, cur_item = [], False

    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        s = line.strip()
        if not s:
            flush()
            i += 1
            continue
        ind = _indent(line)
        if literal_after is not None:
            if ind > literal_after and not cur:
                i = _block_end(lines, i, literal_after)  # the literal block: code, kept out
                literal_after = None
                continue
            literal_after = None
        if _EXPLICIT.match(s):
            flush()
            end = _block_end(lines, i + 1, ind)
            out.extend(_explicit(s, lines[i + 1:end], ctx))
            i = end
            continue
        if _ADORNMENT.match(s) and not (cur and len(cur) > 1):
            flush()  # a section title above stays a line of its own
            i += 1
            continue
        if _GRID_BORDER.match(s):
            flush()
            while i < n and lines[i].strip()[:1] in {"+", "|"}:
                i += 1
            continue
        if _SIMPLE_BORDER.match(s) and not cur:
            j = i + 1
            while j < n and j - i < 400:
                if _SIMPLE_BORDER.match(lines[j].strip()) and (j + 1 >= n or not lines[j + 1].strip()):
                    break
                j += 1
            i = j + 1 if j < n and j - i < 400 else i + 1
            continue
        if s.startswith(">>>") and not cur:
            while i < n and lines[i].strip():
                i += 1  # a doctest block runs to the next blank line
            continue
        field_match = _FIELD.match(s) if not cur else None
        if field_match:
            i = _block_end(lines, i + 1, ind)  # field lists: page metadata and API field notes
            continue
        bullet = _BULLET.match(s)
        # A line opens a block of its own when no paragraph is open, or when it is not indented as
        # the open paragraph's continuation ("Possible states are:" followed by an indented list).
        opens = not cur or (ind < cur_indent if cur_item else ind != cur_indent)
        if bullet and opens:
            flush()
            column = ind + len(s) - len(bullet.group(2))
            if _EXPLICIT.match(bullet.group(2)):
                # An item that opens with a target or directive: the block is indented under the item text.
                end = _block_end(lines, i + 1, column)
                out.extend(_explicit(bullet.group(2), lines[i + 1:end], ctx))
                i = end
                continue
            cur = [bullet.group(2)]
            cur_indent = column
            cur_item = True
            i += 1
            continue
        if s.startswith("| ") or s == "|":
            s = s[1:].strip()  # a line block keeps its lines as text
            if not s:
                i += 1
                continue
        if cur and (ind == cur_indent or (cur_item and ind >= cur_indent)):
            cur.append(s)
        else:
            flush()
            cur, cur_indent = [s], ind
        i += 1
    flush()
    return out


def _skip_options(body: list[str]) -> list[str]:
    i = 0
    while i < len(body) and body[i].strip() and _OPTION.match(body[i].strip()):
        i += 1
    return body[i:]


def _explicit(head: str, body: list[str], ctx: _Context) -> list[str]:
    """Paragraphs of an explicit markup block: a directive, a footnote, or nothing (targets, comments)."""
    body = _dedent(body)
    if _TARGET.match(head) or _SUBSTITUTION.match(head):
        return []
    footnote = _FOOTNOTE.match(head)
    if footnote:
        return _render([footnote.group(2)] + body, ctx)
    directive = _DIRECTIVE.match(head)
    if not directive:
        return []  # a comment
    name, argument = directive.group(1).lower(), (directive.group(2) or "").strip()
    if name in _DROP:
        return []
    if name in _DESCRIPTION:
        # Lines before the first blank one continue the signature or are options.
        start = next((k for k, ln in enumerate(body) if not ln.strip()), len(body))
        return _render(body[start:], ctx)
    if name in _VERSION:
        content = _skip_options(body)
        versions = argument.split(None, 2) if name == "deprecated-removed" else argument.split(None, 1)
        v = versions[0] if versions else ""
        w = versions[1] if name == "deprecated-removed" and len(versions) > 1 else ""
        rest = versions[-1] if len(versions) > (2 if name == "deprecated-removed" else 1) else ""
        paragraphs = _render(([rest] if rest else []) + content, ctx)
        label = _VERSION[name].format(v=v, w=w)
        if not paragraphs:
            return [label + "."]
        return [f"{label}: {paragraphs[0]}"] + paragraphs[1:]
    if name in _BOX:
        content = _skip_options(body)
        if name == "only" or not argument:
            return _render(content, ctx)
        if name in {"admonition", "topic", "sidebar"}:
            title = _finish(argument, ctx)
            return ([title] if title else []) + _render(content, ctx)
        # The argument of a note is the start of its text: "Note: ..." continues on the lines below.
        if content and content[0].strip():
            return _render([argument] + content, ctx)
        return _render([argument, ""] + content, ctx)
    return []  # an unknown directive: its text may be anything, so it is left out


# --- pages -----------------------------------------------------------------------------------

def _titles(lines: list[str]) -> list[tuple[int, str]]:
    """(line index, raw text) of the section titles of a page."""
    found = []
    for k in range(len(lines) - 1):
        text, under = lines[k].strip(), lines[k + 1].strip()
        if text and not _ADORNMENT.match(text) and _ADORNMENT.match(under) and len(under) >= min(len(text), 4) \
                and _indent(lines[k]) <= 3 and not _EXPLICIT.match(text):
            found.append((k, text))
    return found


def _index_page(doc: str, lines: list[str], ctx: _Context) -> None:
    titles = _titles(lines)
    if titles and doc not in ctx.doc_titles:
        ctx.doc_titles[doc] = titles[0][1]
    title_at = dict(titles)
    pending = []
    for k, line in enumerate(lines):
        label = _LABEL_NAME.match(line.strip())
        if label:
            pending.append(label.group(1).strip().lower())
            continue
        if not line.strip():
            continue
        if pending:
            # A label marks the title that follows it, possibly below an overline.
            title = title_at.get(k) or (title_at.get(k + 1) if _ADORNMENT.match(line.strip()) else None)
            for name in pending:
                ctx.labels.setdefault(name, title or "")
            pending = []
    for name in pending:
        ctx.labels.setdefault(name, "")


def _substitutions(lines: list[str]) -> dict[str, str]:
    subs = {}
    for line in lines:
        m = _SUBSTITUTION.match(line.strip())
        if not m:
            continue
        name, kind, value = m.groups()
        if kind == "replace":
            subs[name] = value
        elif kind == "unicode":
            chars = []
            for part in value.split():
                code = re.fullmatch(r"(?:U\+|0x|\\x|\\u)?([0-9A-Fa-f]{2,6})", part)
                if code:
                    chars.append(chr(int(code.group(1), 16)))
            subs[name] = "".join(chars).replace("\u00a0", " ")
    return subs


def _read(path: Path) -> list[str]:
    return path.read_text("utf-8", errors="replace").expandtabs(8).replace("\r\n", "\n").split("\n")


def _doc_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix().removesuffix(".rst.txt")


def source_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.rst.txt")
                  if p.is_file() and not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))


def _build(paths: list[Path], root: Path) -> list[Document]:
    pages = {_doc_name(p, root): _read(p) for p in paths}
    ctx = _Context()
    for doc, lines in pages.items():
        _index_page(doc, lines, ctx)
    docs = []
    for doc, lines in pages.items():
        ctx.doc, ctx.substitutions = doc, _substitutions(lines)
        paragraphs = _render(lines, ctx)
        if paragraphs:
            title = _finish(ctx.doc_titles.get(doc, doc), ctx) or doc
            docs.append(Document(doc_id=f"pydoc:{doc}", text="\n".join(paragraphs), title=title))
    return docs


def _package_version() -> str:
    try:
        status = DPKG_STATUS.read_text("utf-8", errors="replace")
    except OSError:
        return "unknown"
    for stanza in status.split("\n\n"):
        if re.search(rf"^Package: {re.escape(DEBIAN_PACKAGE)}$", stanza, re.MULTILINE):
            version = re.search(r"^Version: (\S+)$", stanza, re.MULTILINE)
            return version.group(1) if version else "unknown"
    return "unknown"


def load() -> Corpus:
    root = Path(SOURCES)
    paths = source_files(root) if root.is_dir() else []
    if not paths:
        raise MissingSourceError(
            f"the Python documentation sources are not installed (no *.rst.txt under {root}); "
            f"install them with: {INSTALL_LINE}"
        )
    hashes = hash_files(paths, root)
    return Corpus(
        name="technical",
        documents=cached_documents("technical", LOADER_VERSION, hashes, lambda: _build(paths, root)),
        source_hashes=hashes,
        description=f"Python {DOC_VERSION} documentation (library reference, tutorial, HOWTOs, ...), reST markup removed",
        license="PSF License Agreement (Python Software Foundation License); documentation examples under the Zero-Clause BSD license",
        notes={"package": f"{DEBIAN_PACKAGE} {_package_version()} (Debian)", "folder": str(root)},
    )

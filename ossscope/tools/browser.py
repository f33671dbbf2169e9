"""harmony's built-in `browser` tool over a local corpus: search (SQLite FTS5), open and find, rendered the way
gpt-oss's reference simple browser renders pages.

The model was trained on this display, so we keep its shape: every page the model sees gets a cursor (its
index in the page stack) and is shown as

    [CURSOR] TITLE (URL)
    **viewing lines [START - END] of LAST**

    L{START}: first line
    ...

with pages wrapped at 80 columns and numbered from L0, about `view_tokens` tokens a view. A search result page
lists its hits as links `【{id}†{title}†{url}】` followed by a snippet; `open(id=...)` follows such a link,
`open(loc=...)` scrolls, `find(pattern=...)` lists matches as `# 【{k}†match at L{n}】`. The model cites what it
read as `【{cursor}†L{start}(-L{end})?】`; `Browser.citations(text)` resolves those to documents and lines.

The corpus is a folder of .txt/.md/.html files or a list of documents. Nothing here touches the network.
"""

from __future__ import annotations

import dataclasses
import html.parser
import re
import sqlite3
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from ossscope.tools.base import ToolUsageError, parse_json_arguments

CORPUS_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm")
FIND_LINK = "# 【{idx}†match at L{line}】"  # one `find` match, as the reference writes it
CITATION = re.compile(r"【(?P<cursor>\d+)†L(?P<start>\d+)(?:-L(?P<end>\d+))?】")
_HARMONY_SOURCES_LINE = "sources=web (default: web)"


@dataclasses.dataclass(frozen=True)
class Document:
    """One page of the corpus: where it lives (`url`, what `open(id="...")` takes), its title and text."""

    url: str
    title: str
    text: str


@dataclasses.dataclass
class Page:
    """A page as the model sees it: a document, a search result list or a find result list.

    links: link id (as text) -> url of the page it opens; anchors: link id -> line of that page to show first.
    """

    url: str
    title: str
    text: str
    links: dict[str, str] = dataclasses.field(default_factory=dict)
    anchors: dict[str, int] = dataclasses.field(default_factory=dict)
    is_listing: bool = False  # search and find results: `find` refuses them, as the reference does

    @property
    def lines(self) -> list[str]:
        return wrap_lines(self.text)


def wrap_lines(text: str, width: int = 80) -> list[str]:
    """Wrap each line at `width` columns keeping whitespace and empty lines (the reference's line numbering)."""
    out: list[str] = []
    for line in text.split("\n"):
        out += textwrap.wrap(line, width=width, replace_whitespace=False, drop_whitespace=False) if line else [""]
    return out


def numbered(lines: list[str], offset: int) -> str:
    """`L{n}: line` for each line, numbered from `offset`."""
    return "\n".join(f"L{offset + i}: {line}" for i, line in enumerate(lines))


def _truncate(text: str, limit: int = 1024) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clean(text: str) -> str:
    """Page text may not contain the link brackets the display uses (the reference swaps them for look-alikes)."""
    return text.replace("【", "〖").replace("】", "〗").replace("\u200b", "")


# -- reading a corpus ---------------------------------------------------------------------------------------


class _HTMLText(html.parser.HTMLParser):
    """Plain text of an HTML page: block elements start lines, script/style dropped, <title> kept apart."""

    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "section", "article", "pre",
              "table", "ul", "ol", "header", "footer", "blockquote"}  # fmt: skip

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self.BLOCKS:
            self.parts.append("\n")
        if tag in ("h1", "h2", "h3"):
            self.parts.append("#" * int(tag[1]) + " ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [line.strip() for line in "".join(self.parts).split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_to_text(source: str) -> tuple[str, str]:
    """(title, text) of an HTML page."""
    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    return parser.title.strip(), parser.text()


def _title_of(text: str, fallback: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip().lstrip("#").strip()[:120] or fallback
    return fallback


def read_corpus(corpus: str | Path | Iterable[Any]) -> list[Document]:
    """Documents from a folder (every .txt/.md/.html file below it, url = its path relative to the folder) or
    from a list of Documents, dicts {text, title?, url?} or strings (title = first line, url = "doc{i}")."""
    if isinstance(corpus, (str, Path)):
        root = Path(corpus)
        if not root.is_dir():
            raise ValueError(f"browser corpus {str(root)!r} is not a folder (pass a folder or a list of documents)")
        docs = []
        for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES):
            raw = path.read_text(encoding="utf-8", errors="replace")
            url = path.relative_to(root).as_posix()
            if path.suffix.lower() in (".html", ".htm"):
                title, text = html_to_text(raw)
                title = title or _title_of(text, path.stem)
            else:
                text, title = raw.strip(), _title_of(raw, path.stem)
            docs.append(Document(url, title, text))
        if not docs:
            raise ValueError(f"browser corpus {str(root)!r} holds no {'/'.join(CORPUS_SUFFIXES)} files")
        return docs
    docs = []
    for i, item in enumerate(corpus):
        if isinstance(item, Document):
            docs.append(item)
        elif isinstance(item, str):
            docs.append(Document(f"doc{i}", _title_of(item, f"doc{i}"), item.strip()))
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            text = item["text"].strip()
            docs.append(Document(str(item.get("url", f"doc{i}")), str(item.get("title") or _title_of(text, f"doc{i}")),
                                 text))  # fmt: skip
        else:
            kind = type(item).__name__
            raise ValueError(f"corpus item {i} is {kind}: expected a str, a Document or a dict with 'text'")
    urls = [d.url for d in docs]
    repeated = sorted({u for u in urls if urls.count(u) > 1})
    if repeated:
        raise ValueError(f"corpus documents share the url(s) {repeated}")
    return docs


# -- the tool ------------------------------------------------------------------------------------------------


class Browser:
    """harmony's `browser` tool (search / open / find) over a local corpus, with the reference's display.

    corpus: a folder or a list of documents (see `read_corpus`). source: the `sources=` line of the tool's
    description; None keeps harmony's own declaration byte for byte (`sources=web (default: web)`), which is
    what the model saw in training. max_results caps `topn`; view_tokens is about how much one view shows.
    State (the page stack the cursors index) lives on the object: one Browser per conversation.
    """

    name = "browser"

    def __init__(
        self,
        corpus: str | Path | Iterable[Any],
        source: str | None = None,
        max_results: int = 10,
        view_tokens: int = 1024,
    ):
        if max_results < 1 or view_tokens < 1:
            raise ValueError(f"max_results and view_tokens must be positive, got {max_results}, {view_tokens}")
        self.documents = read_corpus(corpus)
        self.by_url = {doc.url: doc for doc in self.documents}
        self.source = source
        self.max_results = max_results
        self.view_tokens = view_tokens
        self.pages: list[Page] = []  # the page stack; a cursor is an index into it
        self._db = _index(self.documents)

    # -- declaration ------------------------------------------------------------------------------------
    def tool_config(self) -> Any:
        """The namespace declaration for the system message (openai-harmony's ToolNamespaceConfig.browser(),
        with the `sources=` line replaced when `source` is given, as the reference does)."""
        from openai_harmony import ToolNamespaceConfig

        config = ToolNamespaceConfig.browser()
        if self.source is not None:
            config.description = config.description.replace(_HARMONY_SOURCES_LINE, f"sources={self.source}")
        return config

    def reset(self) -> None:
        """Forget every page (a new conversation)."""
        self.pages = []

    @property
    def cursor(self) -> int:
        """The cursor of the latest page (-1 when none is open)."""
        return len(self.pages) - 1

    # -- dispatch ---------------------------------------------------------------------------------------
    def parse_arguments(self, function: str, text: str) -> dict[str, Any]:
        """JSON arguments of `browser.FUNCTION`, checked against the declared schema."""
        schemas = {tool.name: tool.parameters for tool in self.tool_config().tools}
        if function not in schemas:
            raise ToolUsageError(f"unknown function browser.{function}; the browser has search, open and find")
        return parse_json_arguments(f"browser.{function}", text, schemas[function])

    def call(self, function: str, arguments: dict[str, Any]) -> str:
        """Run `browser.FUNCTION` with parsed JSON arguments; ToolUsageError says what the model got wrong."""
        methods = {"search": self.search, "open": self.open, "find": self.find}
        if function not in methods:
            raise ToolUsageError(f"unknown function browser.{function}; the browser has search, open and find")
        try:
            return methods[function](**arguments)
        except TypeError as exc:  # an argument the function does not take
            raise ToolUsageError(f"browser.{function}: {exc}") from exc

    # -- the three functions ----------------------------------------------------------------------------
    def search(self, query: str, topn: int = 10, source: str | None = None) -> str:
        """Search the corpus; shows a result page whose links `open(id=...)` follows."""
        del source  # one corpus: nothing to choose between
        if not isinstance(query, str) or not query.strip():
            raise ToolUsageError("`query` must be a non-empty string")
        limit = max(1, min(self.max_results, _as_int(topn, "topn")))
        hits = _search(self._db, query, limit)
        items, links, anchors = [], {}, {}
        for i, (doc_index, snippet) in enumerate(hits):
            doc = self.documents[doc_index]
            links[str(i)] = doc.url
            anchors[str(i)] = _first_line_matching(Page(doc.url, doc.title, _clean(doc.text)).lines, query)
            items.append(f"* 【{i}†{_clean(doc.title)}†{doc.url}】 {_clean(snippet)}")
        text = "# Search Results\n\n" + ("\n".join(items) if items else f"No results for `{query}`.")
        return self._show(Page("", query, text, links, anchors, is_listing=True), loc=0)

    def open(
        self,
        id: int | str = -1,  # noqa: A002 - the model's argument name
        cursor: int = -1,
        loc: int = -1,
        num_lines: int = -1,
        view_source: bool = False,
        source: str | None = None,
    ) -> str:
        """Open link `id` of the page at `cursor`, a document by url (`id` a string), or scroll (no `id`)."""
        del view_source, source  # local text has no other source to show
        loc, num_lines = _as_int(loc, "loc"), _as_int(num_lines, "num_lines")
        if isinstance(id, str):
            doc = self.by_url.get(id)
            if doc is None:
                raise ToolUsageError(f"no document at `{_truncate(id, 200)}` in this corpus")
            page, anchor = _doc_page(doc), None
        else:
            current = self._page(_as_int(cursor, "cursor"))
            link = _as_int(id, "id")
            if link < 0:  # scroll the page
                page, anchor = current, None
            else:
                if str(link) not in current.links:
                    raise ToolUsageError(f"Invalid link id `{link}`.")
                url = current.links[str(link)]
                target = self.by_url.get(url)
                page = _doc_page(target) if target is not None else self._page_by_url(url)
                anchor = current.anchors.get(str(link))
        if loc < 0:  # start a little above the passage the link points at, as the reference does
            loc = max(0, anchor - 4) if anchor is not None and anchor > 4 else 0
        return self._show(page, loc, num_lines)

    def find(self, pattern: str, cursor: int = -1) -> str:
        """Exact (case-insensitive) matches of `pattern` in the page at `cursor`, four lines each."""
        if not isinstance(pattern, str) or not pattern:
            raise ToolUsageError("`pattern` must be a non-empty string")
        page = self._page(_as_int(cursor, "cursor"))
        if page.is_listing:
            raise ToolUsageError("Cannot run `find` on search results page or find results page")
        needle = pattern.lower()
        lines = page.lines
        chunks, links, anchors = [], {}, {}
        i = 0
        while i < len(lines) and len(chunks) < 50:
            if needle not in lines[i].lower():
                i += 1
                continue
            k = str(len(chunks))
            chunks.append(FIND_LINK.format(idx=k, line=i) + "\n" + "\n".join(lines[i : i + 4]))
            links[k], anchors[k] = page.url, i
            i += 4
        text = "\n\n".join(chunks) if chunks else f"No `find` results for pattern: `{pattern}`"
        title = f"Find results for text: `{pattern}` in `{page.title}`"
        result = Page(f"{page.url}/find?pattern={quote(pattern)}", title, text, links, anchors, is_listing=True)
        return self._show(result, loc=0)

    # -- citations --------------------------------------------------------------------------------------
    def citations(self, text: str) -> list[dict[str, Any]]:
        """The `【cursor†Lstart(-Lend)?】` citations in `text`, resolved against the pages shown so far:
        [{cursor, start, end, url, title, lines, valid}], `valid` False when the cursor or lines do not exist."""
        out = []
        for match in CITATION.finditer(text):
            cursor, start = int(match["cursor"]), int(match["start"])
            end = int(match["end"]) if match["end"] else start
            page = self.pages[cursor] if cursor < len(self.pages) else None
            lines = page.lines if page is not None else []
            valid = page is not None and 0 <= start <= end < len(lines)
            out.append({
                "cursor": cursor, "start": start, "end": end, "url": page.url if page else None,
                "title": page.title if page else None, "lines": lines[start : end + 1] if valid else [],
                "valid": valid,
            })  # fmt: skip
        return out

    # -- internals --------------------------------------------------------------------------------------
    def _page(self, cursor: int) -> Page:
        if not self.pages:
            raise ToolUsageError("No pages to access!")
        if cursor in (-1, self.cursor):
            return self.pages[-1]
        if not 0 <= cursor < len(self.pages):
            raise ToolUsageError(f"Cursor `{cursor}` is out of range. Available cursor indices: [0 - {self.cursor}].")
        return self.pages[cursor]

    def _page_by_url(self, url: str) -> Page:
        for page in reversed(self.pages):
            if page.url == url:
                return page
        raise ToolUsageError(f"no document at `{_truncate(url, 200)}` in this corpus")

    def _show(self, page: Page, loc: int, num_lines: int = -1) -> str:
        """Push `page` on the stack and render its view from line `loc` (the new cursor in brackets)."""
        lines = page.lines
        if loc >= len(lines):
            last = len(lines) - 1
            raise ToolUsageError(f"Invalid location parameter: `{loc}`. Cannot exceed page maximum of {last}.")
        end = self._end_line(lines, loc, num_lines)
        self.pages.append(page)
        header = page.title + (f" ({_truncate(unquote(page.url))})" if page.url else "")
        scrollbar = f"viewing lines [{loc} - {end - 1}] of {len(lines) - 1}"
        return f"[{self.cursor}] {header}\n**{scrollbar}**\n\n{numbered(lines[loc:end], loc)}"

    def _end_line(self, lines: list[str], loc: int, num_lines: int) -> int:
        """One past the last line to show: `num_lines` when given, else as many as fit in view_tokens (the
        line that crosses the budget is still shown, as the reference rounds up)."""
        if num_lines > 0:
            return min(loc + num_lines, len(lines))
        from ossscope.tokenizer import harmony_encoding

        enc = harmony_encoding()
        used = 0
        for i in range(loc, len(lines)):
            # disallowed_special=(): page text that looks like a special token is text here (and the check
            # harmony would otherwise run builds a regex of every special token on every call)
            used += len(enc.encode(f"L{i}: {lines[i]}\n", allowed_special=set(), disallowed_special=()))
            if used > self.view_tokens:
                return i + 1
        return len(lines)


def _as_int(value: Any, name: str) -> int:
    """The model writes numbers as JSON numbers (sometimes 3.0 or "3"); anything not a whole number is an error."""
    if isinstance(value, bool):
        raise ToolUsageError(f"`{name}` should be an integer, not a boolean")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    if not isinstance(value, int):
        raise ToolUsageError(f"`{name}` should be an integer, not `{type(value).__name__}`")
    return value


def _doc_page(doc: Document) -> Page:
    return Page(doc.url, _clean(doc.title), _clean(doc.text))


def _terms(query: str) -> list[str]:
    return [w.lower() for w in re.findall(r"\w+", query)]


def _first_line_matching(lines: list[str], query: str) -> int:
    """The first line holding the most query words (where `open` should show the document from)."""
    terms = set(_terms(query))
    best, best_line = 0, 0
    for i, line in enumerate(lines):
        score = len(terms & set(_terms(line)))
        if score > best:
            best, best_line = score, i
    return best_line


# -- the index -----------------------------------------------------------------------------------------------


def _index(docs: list[Document]) -> sqlite3.Connection:
    """An in-memory FTS5 index (porter stemming) of titles and texts; row id = document index + 1."""
    db = sqlite3.connect(":memory:", check_same_thread=False)
    try:
        db.execute("CREATE VIRTUAL TABLE pages USING fts5(title, body, tokenize='porter unicode61')")
    except sqlite3.OperationalError as exc:
        raise RuntimeError(f"this Python's SQLite ({sqlite3.sqlite_version}) has no FTS5: {exc}") from exc
    db.executemany(
        "INSERT INTO pages(rowid, title, body) VALUES (?, ?, ?)",
        [(i + 1, doc.title, doc.text) for i, doc in enumerate(docs)],
    )
    db.commit()
    return db


def _search(db: sqlite3.Connection, query: str, limit: int) -> list[tuple[int, str]]:
    """(document index, snippet) of the best matches of any of the query's words, best (BM25, titles weigh
    more) first. Words are quoted, so FTS5's query syntax in the model's text cannot break the query."""
    terms = list(dict.fromkeys(_terms(query)))
    if not terms:
        return []
    match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
    rows = db.execute(
        "SELECT rowid, snippet(pages, 1, '', '', '...', 24) FROM pages WHERE pages MATCH ? "
        "ORDER BY bm25(pages, 5.0, 1.0), rowid LIMIT ?",
        (match, limit),
    ).fetchall()
    return [(rowid - 1, " ".join(snippet.split())) for rowid, snippet in rows]


__all__ = ["Browser", "Document", "Page", "CITATION", "read_corpus", "html_to_text", "wrap_lines"]

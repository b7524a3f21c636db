"""Web fetch and web search (book chapter 15's tools), with the guards a tool that reaches the network needs.

`fetch(url, question)`: GET an http(s) URL and give back its readable text (HTML without scripts, styles and
markup; plain text; JSON), cut into chunks of about `CHUNK_WORDS` words, ranked against `question` (BM25) so the
model reads the parts that matter. Guards:

- addresses: the host name is resolved once, every address it resolves to must be public (`ipaddress`'s
  `is_global`: no loopback, private, link-local, shared, multicast or reserved address, IPv4-mapped IPv6 included)
  unless `allow_private=True`, and the connection goes to the address that was checked (a second DNS answer cannot
  swap it: no DNS rebinding). The same check runs on every redirect (at most `max_redirects`).
- size: at most `max_bytes` of body are read (the rest is dropped and the result says it was truncated);
- time: one deadline for the whole fetch (DNS, connection, redirects, reading), each socket operation bounded by
  what is left of it.
- content: text/html, text/plain, application/json (and other text/*) only.

`search(query)`: a search provider at a configurable URL (`provider_url`, with `{query}` where the words go; default
`$TORCHBOOK_SEARCH_URL`), answering JSON in SearxNG's format (`{"results": [{"title", "url", "content"}]}`) or a list
of such results. The provider is the user's own choice (often a SearxNG on their machine), so its address is not
refused; its results are links to `fetch`, which is guarded.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urljoin, urlsplit

from torchbook.chat.tools.registry import ToolError
from torchbook.knowledge.documents import UnreadableFile, extract_text

MAX_BYTES = 2_000_000
TIMEOUT_S = 15.0
MAX_REDIRECTS = 5
CHUNK_WORDS = 200
CHUNK_OVERLAP = 30
USER_AGENT = "torchbook-chat/0.1 (+https://github.com/torchbook)"
TEXT_TYPES = ("text/", "application/json", "application/xhtml+xml", "application/xml")
SEARCH_URL_ENV = "TORCHBOOK_SEARCH_URL"
URL_IN_TEXT = re.compile(r"https?://[^\s<>\"'`)\]]+")


@dataclass
class Page:
    url: str  # after redirects
    status: int
    content_type: str
    text: str
    truncated: bool = False
    redirects: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        first = self.text.strip().splitlines()
        return first[0][:120] if first else self.url


@dataclass
class Passage:
    text: str
    score: float
    index: int  # which chunk of the page


def refusal(host: str, address: str) -> str | None:
    """Why fetching from `address` (resolved from `host`) is refused, or None when it is a public address."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_global and not ip.is_multicast:
        return None
    kind = ("a loopback" if ip.is_loopback else "a link-local" if ip.is_link_local else
            "a multicast" if ip.is_multicast else "an unspecified" if ip.is_unspecified else
            "a private" if ip.is_private else "a reserved or non-public")
    return f"{host} resolves to {address}, {kind} address"


def _resolve(host: str, port: int, allow_private: bool) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ToolError(f"cannot resolve {host}: {e.strerror}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise ToolError(f"{host} has no address")
    if not allow_private:
        for address in addresses:  # every answer must be public: one private answer is enough to refuse
            if why := refusal(host, address):
                raise ToolError(f"refused: {why} (private, loopback and link-local addresses are not fetched)")
    return addresses[0]


def fetch_page(url: str, *, allow_private: bool = False, max_bytes: int = MAX_BYTES, timeout: float = TIMEOUT_S,
               max_redirects: int = MAX_REDIRECTS, accept: str = "text/html, text/plain, application/json") -> Page:
    """GET `url` under the guards of the module docstring; a `ToolError` says why it failed or was refused."""
    deadline = time.monotonic() + timeout
    redirects: list[str] = []
    for _ in range(max_redirects + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ToolError(f"only http and https URLs are fetched, not {url!r}")
        if not parts.hostname:
            raise ToolError(f"the URL {url!r} has no host")
        if parts.username or parts.password:
            raise ToolError("URLs with a user name or password are not fetched")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ToolError(f"the URL {url!r} has an invalid port") from None
        address = _resolve(parts.hostname, port, allow_private)
        left = deadline - time.monotonic()
        if left <= 0:
            raise ToolError(f"fetching {url} took longer than {timeout:g} s")
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = connection_class(parts.hostname, port, timeout=left)

        def pinned(addr: tuple[str, int], timeout: Any = None, source_address: Any = None,
                   _address: str = address, _port: int = port) -> socket.socket:
            # Connect to the address that was checked, whatever the name resolves to now (no DNS rebinding);
            # TLS still verifies the certificate against the host name.
            return socket.create_connection((_address, _port), timeout, source_address)

        conn._create_connection = pinned  # type: ignore[attr-defined]
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.request("GET", path, headers={"User-Agent": USER_AGENT, "Accept": accept,
                                               "Accept-Encoding": "identity", "Connection": "close"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                conn.close()
                if not location:
                    raise ToolError(f"{url} redirects without a Location")
                redirects.append(url)
                url = urljoin(url, location)
                continue
            content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            charset = _charset(response.getheader("Content-Type") or "")
            if response.status >= 400:
                raise ToolError(f"{url} answered HTTP {response.status} {response.reason}")
            if content_type and not content_type.startswith(TEXT_TYPES):
                raise ToolError(f"{url} is {content_type}, not text (HTML, plain text or JSON)")
            body, truncated = _read(response, max_bytes, deadline, url, timeout)
        except TimeoutError:
            raise ToolError(f"fetching {url} took longer than {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise ToolError(f"cannot fetch {url}: {e}") from None
        finally:
            conn.close()
        return Page(url, response.status, content_type, readable_text(body, content_type, charset), truncated,
                    redirects)
    raise ToolError(f"{redirects[0]} redirects more than {max_redirects} times")


def _charset(header: str) -> str:
    m = re.search(r"charset=([\w.-]+)", header, re.I)
    return m.group(1) if m else "utf-8"


def _read(response: http.client.HTTPResponse, max_bytes: int, deadline: float, url: str,
          timeout: float) -> tuple[bytes, bool]:
    parts, size = [], 0
    while size <= max_bytes:
        if time.monotonic() > deadline:
            raise ToolError(f"fetching {url} took longer than {timeout:g} s")
        piece = response.read1(min(65536, max_bytes + 1 - size)) if hasattr(response, "read1") else \
            response.read(min(65536, max_bytes + 1 - size))
        if not piece:
            break
        parts.append(piece)
        size += len(piece)
    body = b"".join(parts)
    return body[:max_bytes], len(body) > max_bytes


def readable_text(body: bytes, content_type: str, charset: str = "utf-8") -> str:
    """The text a reader sees: HTML without markup, scripts and styles; JSON pretty-printed; text as is."""
    try:
        text = body.decode(charset, errors="replace")
    except LookupError:
        text = body.decode("utf-8", errors="replace")
    if "html" in content_type or (not content_type and text.lstrip()[:1] == "<"):
        try:
            return extract_text(Path("page.html"), text.encode("utf-8"))
        except UnreadableFile as e:
            raise ToolError(f"the page is not readable: {e}") from None
    if "json" in content_type:
        try:
            return json.dumps(json.loads(text), indent=1, ensure_ascii=False)
        except json.JSONDecodeError:
            return text
    return text


def chunks(text: str, words: int = CHUNK_WORDS, overlap: int = CHUNK_OVERLAP) -> list[str]:
    """Windows of `words` words, each starting `words - overlap` words after the previous one."""
    tokens = text.split()
    if not tokens:
        return []
    step = max(1, words - overlap)
    return [" ".join(tokens[i : i + words]) for i in range(0, max(1, len(tokens) - overlap), step)]


def rank(question: str, passages: list[str], k: int) -> list[Passage]:
    """The `k` passages most relevant to `question` by BM25 (in page order when there is no question)."""
    if not passages:
        return []
    if not question.strip():
        return [Passage(p, 0.0, i) for i, p in enumerate(passages[:k])]
    import bm25s  # optional (the knowledge extra)

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize([question], stopwords="en", return_ids=False, show_progress=False)[0]
    if not tokens:
        return [Passage(p, 0.0, i) for i, p in enumerate(passages[:k])]
    scores = retriever.get_scores(tokens)
    order = sorted(range(len(passages)), key=lambda i: (-float(scores[i]), i))[:k]
    return [Passage(passages[i], float(scores[i]), i) for i in order]


def fetch(url: str, question: str = "", k: int = 3, **guards: Any) -> tuple[Page, list[Passage]]:
    """The page at `url` and its `k` passages most relevant to `question`."""
    page = fetch_page(url, **guards)
    return page, rank(question, chunks(page.text), k)


def fetch_text(url: str, question: str = "", k: int = 3, **guards: Any) -> tuple[str, list[str]]:
    """What the fetch tool gives the model: the passages with the page's URL (and the URL as its source)."""
    page, passages = fetch(url, question, k, **guards)
    if not passages:
        return f"{page.url} has no text", [page.url]
    note = " (the page was longer than the size limit: cut)" if page.truncated else ""
    body = "\n---\n".join(p.text for p in sorted(passages, key=lambda p: p.index))
    return f"From {page.url}{note}:\n{body}", [page.url]


def find_urls(text: str) -> list[str]:
    return [u.rstrip(".,;:!?") for u in URL_IN_TEXT.findall(text)]


@dataclass
class SearchResult:
    title: str
    url: str
    snippet: str


def search(query: str, provider_url: str | None = None, k: int = 5, timeout: float = TIMEOUT_S) -> list[SearchResult]:
    """Ask the search provider (see the module docstring) for `query`; at most `k` results."""
    template = provider_url or os.environ.get(SEARCH_URL_ENV)
    if not template:
        raise ToolError(f"no search provider is configured; set ${SEARCH_URL_ENV} to a URL with {{query}} "
                        "(for example a SearxNG at http://localhost:8888/search?q={query}&format=json)")
    if "{query}" not in template:
        raise ToolError(f"the search provider URL {template!r} has no {{query}} for the words")
    if not query.strip():
        raise ToolError("the search query is empty")
    page = fetch_page(template.replace("{query}", quote_plus(query)), allow_private=True, timeout=timeout,
                      accept="application/json")
    try:
        answer = json.loads(page.text)
    except json.JSONDecodeError:
        raise ToolError("the search provider did not answer JSON") from None
    items = answer.get("results", []) if isinstance(answer, dict) else answer
    if not isinstance(items, list):
        raise ToolError("the search provider's answer has no list of results")
    results = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            results.append(SearchResult(str(item.get("title") or item["url"]), item["url"],
                                        str(item.get("content") or item.get("snippet") or "")))
    return results[:k]


def search_text(query: str, provider_url: str | None = None, k: int = 5) -> tuple[str, list[str]]:
    results = search(query, provider_url, k)
    if not results:
        return f"no results for {query!r}", []
    lines = [f"{i}. {r.title} <{r.url}>\n   {r.snippet}" for i, r in enumerate(results, 1)]
    return "\n".join(lines), [r.url for r in results]

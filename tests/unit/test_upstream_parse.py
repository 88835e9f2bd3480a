"""The lean upstream client's HTTP/1.1 response reading, without sockets: heads, and
bodies by their framing, whatever the network's cuts (hypothesis, fixed seed in CI)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sseserver.providers.upstream.origin import Origin, proxy_for, split_url
from sseserver.providers.upstream.parse import BodyReader, Head, ResponseError, parse_head
from sseserver.wire.chunked import frame


def head(**headers: str) -> Head:
    fields = "".join(f"\r\n{k.replace('_', '-')}: {v}" for k, v in headers.items())
    return parse_head(f"HTTP/1.1 200 OK{fields}".encode())


def read_all(reader: BodyReader, pieces: list[bytes]) -> tuple[bytes, bytes]:
    body, extra = b"", b""
    for piece in pieces:
        got, left = reader.feed(piece)
        body += b"".join(got)
        extra += left
    return body, extra


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(marks)]


def test_head_fields_lower_cased_and_repeats_joined() -> None:
    h = parse_head(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nX-A: 1\r\nx-a: 2")
    assert (h.status, h.reason) == (429, "Too Many Requests")
    assert h.headers == {"retry-after": "3", "x-a": "1, 2"}
    assert h.keep_alive


@pytest.mark.parametrize(
    ("raw", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close", False),
        (b"HTTP/1.0 200 OK", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive", True),
    ],
)
def test_keep_alive_by_version_and_connection(raw: bytes, keep_alive: bool) -> None:
    assert parse_head(raw).keep_alive is keep_alive


@pytest.mark.parametrize(
    "raw",
    [b"HTTP/2 200 OK", b"HTTP/1.1 2000 OK", b"ICY 200 OK", b"HTTP/1.1 200 OK\r\nbad line"],
)
def test_malformed_heads_are_refused(raw: bytes) -> None:
    with pytest.raises(ResponseError):
        parse_head(raw)


@given(
    payloads=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_chunked_body_whatever_the_cuts(payloads: list[bytes], points: list[int]) -> None:
    # The server's own chunk framing, then the terminator and a trailer field.
    wire = b"".join(frame(p) for p in payloads) + b"0\r\nX-Trailer: 1\r\n\r\n"
    reader = BodyReader(head(transfer_encoding="chunked"))
    body, extra = read_all(reader, cut(wire, points))
    assert body == b"".join(payloads)
    assert reader.done and extra == b""


def test_chunk_extensions_are_ignored_and_bytes_past_the_end_returned() -> None:
    reader = BodyReader(head(transfer_encoding="chunked"))
    body, extra = read_all(reader, [b"3;name=v\r\nabc\r\n0\r\n\r\nHTTP/1.1"])
    assert (body, extra, reader.done) == (b"abc", b"HTTP/1.1", True)


@pytest.mark.parametrize(
    "wire", [b"zz\r\n", b"3\r\nabcd\r\n", b"-1\r\n", b"0x3\r\nabc\r\n", b"1" * 5000]
)
def test_bad_chunk_framing_is_refused(wire: bytes) -> None:
    reader = BodyReader(head(transfer_encoding="chunked"))
    with pytest.raises(ResponseError):
        reader.feed(wire)


def test_content_length_body_ends_at_its_length() -> None:
    reader = BodyReader(head(content_length="5"))
    assert read_all(reader, [b"he", b"llo!"]) == (b"hello", b"!")
    assert reader.done


def test_no_length_reads_to_the_close_and_no_body_statuses() -> None:
    assert BodyReader(head()).until_close
    assert BodyReader(parse_head(b"HTTP/1.1 204 No Content")).done
    assert BodyReader(head(content_length="9"), method="HEAD").done
    with pytest.raises(ResponseError):
        BodyReader(head(content_length="1, 2"))


def test_urls_and_origins() -> None:
    assert split_url("https://api.example.com/v1/chat?x=1") == (
        Origin("https", "api.example.com", 443),
        "/v1/chat?x=1",
    )
    assert Origin("http", "127.0.0.1", 8080).authority == "127.0.0.1:8080"
    assert Origin("https", "::1", 443).authority == "[::1]"
    with pytest.raises(ValueError):
        split_url("ftp://example.com/")


def test_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    target = Origin("https", "api.example.com", 443)
    assert proxy_for(target) is None
    monkeypatch.setenv("HTTPS_PROXY", "http://user:p%40ss@proxy.local:3128")
    proxy = proxy_for(target)
    assert proxy is not None
    assert proxy.origin == Origin("http", "proxy.local", 3128)
    assert proxy.authorization == "Basic dXNlcjpwQHNz"  # user:p@ss
    monkeypatch.setenv("NO_PROXY", ".example.com")
    assert proxy_for(target) is None

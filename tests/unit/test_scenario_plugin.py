"""The pytest plugin (``sseserver.testing.pytest_plugin``): registered by the package's
``pytest11`` entry point, cheap when unused (nothing of the server imported), and its
fixture serving scenarios from a thread to sync tests (examples/ has a whole suite)."""

from __future__ import annotations

import http.client
import importlib.metadata
import subprocess
import sys

import pytest

from sseserver.testing import SSEServer, query_string


def test_the_plugin_is_registered_by_its_entry_point(pytestconfig: pytest.Config) -> None:
    names = {e.name: e.value for e in importlib.metadata.entry_points(group="pytest11")}
    assert names.get("sseserver") == "sseserver.testing.pytest_plugin"
    assert pytestconfig.pluginmanager.has_plugin("sseserver")


def test_loading_the_plugin_imports_nothing_of_the_server() -> None:
    code = (
        "import sys, sseserver.testing.pytest_plugin\n"
        "heavy = [m for m in ('sseserver.cli', 'openai', 'google.genai', 'redis') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_query_strings_of_scenario_parameters() -> None:
    assert query_string({"split": 1, "bom": True, "space": False, "split_at": [2, 5]}) == (
        "split=1&bom=1&space=0&split_at=2%2C5"
    )
    assert query_string({"retry": None, "event": "a b"}) == "event=a%20b"


def test_the_fixture_serves_scenarios_to_a_sync_test(sse_server: SSEServer) -> None:
    url = sse_server.scenario(events=2, line_endings="crlf")
    assert url.startswith(f"http://127.0.0.1:{sse_server.port}/v1/test/stream?")
    conn = http.client.HTTPConnection(sse_server.host, sse_server.port, timeout=10)
    conn.request("GET", url.removeprefix(sse_server.base_url))
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 200
    assert body == b"id: 1\r\ndata: event 1\r\n\r\nid: 2\r\ndata: event 2\r\n\r\n"
    assert [e.data for e in sse_server.expected(events=2)] == ["event 1", "event 2"]
    assert sse_server.status("/healthz") == (200, {"status": "ok"})
    assert sse_server.config.test_endpoints


@pytest.fixture
def sse_server_options() -> dict[str, object]:
    return {"heartbeat_s": 0.5}


def test_options_can_be_overridden(sse_server: SSEServer) -> None:
    assert sse_server.config.heartbeat_s == 0.5

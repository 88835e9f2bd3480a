"""Operations and the demo: health, readiness, the provider list and static files."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from ..http.request import Request
from ..http.stream import EventStream
from ..web.app import Application
from ..web.context import Context
from ..wire.errors import HTTPError

PACKAGE_STATIC = Path(__file__).resolve().parent.parent / "static"
MAX_STATIC_FILE = 4 * 1024 * 1024


def load_static(folder: Path) -> dict[str, tuple[bytes, str]]:
    """Every regular file directly in ``folder``, read once at start-up. Serving only
    names from this table means no request path can ever reach outside the folder."""
    files: dict[str, tuple[bytes, str]] = {}
    if not folder.is_dir():
        return files
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.is_symlink() and path.stat().st_size <= MAX_STATIC_FILE:
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if ctype.startswith("text/") or ctype in ("application/javascript",):
                ctype += "; charset=utf-8"
            files[path.name] = (path.read_bytes(), ctype)
    return files


def register(app: Application, ctx: Context) -> None:
    folder = Path(ctx.config.static_dir) if ctx.config.static_dir else PACKAGE_STATIC
    static = load_static(folder)
    static_headers = [("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff")]

    @app.route(["GET"], "/healthz", auth="none", limited=False)
    async def healthz(request: Request, stream: EventStream) -> None:
        stream.respond_json(200, {"status": "ok"})

    @app.route(["GET"], "/readyz", auth="none", limited=False)
    async def readyz(request: Request, stream: EventStream) -> None:
        if ctx.shutting_down:
            stream.respond_json(503, {"status": "shutting_down"}, [("Retry-After", "1")])
        elif not ctx.hub.ready:
            stream.respond_json(503, {"status": "hub_unavailable"}, [("Retry-After", "1")])
        else:
            stream.respond_json(200, {"status": "ready"})

    @app.route(["GET"], "/metrics", auth="optional", limited=False)
    async def metrics(request: Request, stream: EventStream) -> None:
        body, ctype = ctx.metrics.render()
        stream.respond(200, body, content_type=ctype)

    @app.route(["GET"], "/v1/providers", auth="optional", limited=False)
    async def providers(request: Request, stream: EventStream) -> None:
        stream.respond_json(
            200,
            {
                "default": ctx.config.provider,
                "providers": [
                    {"name": name, "default_model": p.default_model, "models": list(p.models)}
                    for name, p in ctx.providers.items()
                ],
            },
        )

    def serve(name: str, stream: EventStream) -> None:
        entry = static.get(name)
        if entry is None:
            raise HTTPError(404, "not_found", "no such file")
        body, ctype = entry
        stream.respond(200, body, static_headers, content_type=ctype)

    @app.route(["GET"], "/", auth="optional", limited=False)
    async def index(request: Request, stream: EventStream) -> None:
        serve("index.html", stream)

    @app.route(["GET"], "/static/{name}", auth="optional", limited=False)
    async def static_file(request: Request, stream: EventStream) -> None:
        serve(request.params["name"], stream)

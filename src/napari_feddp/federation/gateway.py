"""The coordinator's only public endpoint: a TLS gateway that forwards Flower's Fleet API.

Flower 1.42's SuperLink serves three APIs on one HTTP port: Fleet
(``/v1/fleet/*``, what SuperNodes call), Control (``/v1/control/*``: list and
register nodes, submit runs, read logs) and Runtime (``/v1/runtime/*``: where
a SuperExec picks up the ServerApp). Open-source Flower has no account
authentication on Control, so exposing that port lets anyone who holds the
public CA certificate administer the federation.

The coordinator therefore binds the SuperLink to loopback and runs this
gateway on the address labs dial. It terminates TLS with the SuperLink's
certificate and forwards ``POST /v1/fleet/...`` unchanged (SuperNode
authentication travels in signed headers, so it still happens at the
SuperLink); every other path is answered ``404`` without contacting the
SuperLink.

Run as ``python -m napari_feddp.federation.gateway`` (see :func:`gateway_argv`);
:class:`~napari_feddp.federation.coordinator.Coordinator` starts it.
"""

from __future__ import annotations

import argparse
import contextlib
import ssl
import sys
from pathlib import Path

#: The only path prefix forwarded to the SuperLink.
FLEET_PREFIX = "/v1/fleet/"
#: Largest request body accepted (model weights travel in chunks far below this).
MAX_BODY_BYTES = 256 * 1024 * 1024
#: Request headers not forwarded (hop-by-hop, or recomputed by the client).
_DROP_REQUEST = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding", "upgrade",
                           "proxy-authorization", "te", "trailer"})  # fmt: skip
#: Response headers not copied back.
_DROP_RESPONSE = frozenset({"content-length", "connection", "keep-alive", "transfer-encoding", "server", "date"})


def create_app(upstream: str, *, ca_cert: str | Path | None, timeout: float = 300.0):
    """Starlette (ASGI) app forwarding Fleet calls to the SuperLink at ``upstream`` (``HOST:PORT`` on loopback).

    ``ca_cert`` signed the SuperLink's certificate (None: plain HTTP upstream);
    ``timeout`` is in seconds per forwarded request.
    """
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    scheme = "http" if ca_cert is None else "https"
    verify: bool | ssl.SSLContext = False if ca_cert is None else ssl.create_default_context(cafile=str(ca_cert))
    client = httpx.AsyncClient(base_url=f"{scheme}://{upstream}", verify=verify, timeout=timeout)

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(FLEET_PREFIX) or ".." in path:
            return JSONResponse({"detail": "not found"}, status_code=404)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            return JSONResponse({"detail": "request too large"}, status_code=413)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"detail": "request too large"}, status_code=413)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        try:
            reply = await client.post(path, content=body, headers=headers)
        except httpx.HTTPError:
            return JSONResponse({"detail": "SuperLink unavailable"}, status_code=503)
        out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP_RESPONSE}
        return Response(reply.content, status_code=reply.status_code, headers=out_headers)

    async def not_found(request: Request) -> Response:
        return JSONResponse({"detail": "not found"}, status_code=404)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        await client.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])],
                     exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)  # fmt: skip


def gateway_argv(listen_host: str, listen_port: int, upstream: str, *, certfile: str | Path | None,
                 keyfile: str | Path | None, ca_cert: str | Path | None) -> list[str]:
    """Command line of the gateway process (TLS unless every TLS file is None)."""
    argv = [sys.executable, "-m", __name__, "--host", listen_host, "--port", str(listen_port),
            "--upstream", upstream]  # fmt: skip
    if certfile is not None:
        argv += ["--certfile", str(Path(certfile).resolve()), "--keyfile", str(Path(keyfile).resolve()),
                 "--ca", str(Path(ca_cert).resolve())]  # fmt: skip
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_feddp.federation.gateway",
                                     description="Expose only Flower's Fleet API of a SuperLink on loopback.")
    parser.add_argument("--host", required=True, help="address labs dial")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the SuperLink")
    parser.add_argument("--certfile", help="server certificate (the SuperLink's)")
    parser.add_argument("--keyfile", help="its private key")
    parser.add_argument("--ca", help="CA certificate that verifies the SuperLink")
    args = parser.parse_args(argv)
    if bool(args.certfile) != bool(args.keyfile) or (args.certfile and not args.ca):
        parser.error("--certfile, --keyfile and --ca go together")

    import uvicorn

    app = create_app(args.upstream, ca_cert=args.ca)
    print(f"Fleet gateway on {args.host}:{args.port} -> {args.upstream} "
          f"({'TLS' if args.certfile else 'PLAIN TEXT'})", flush=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.certfile, ssl_keyfile=args.keyfile,
                log_level="warning", access_log=False, server_header=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

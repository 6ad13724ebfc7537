"""A small asyncio HTTP/1.1 server (httptools + uvloop) for the service's own endpoints."""

from ext_proc.http.server import AbortConnection, Handler, HttpServer, Request, Response

__all__ = ["AbortConnection", "Handler", "HttpServer", "Request", "Response"]

"""HTTP/1.1 protocol handling for the server: request bodies, JSON and server-sent-event replies,
keep-alive that stays correct after errors, and telling when a client has gone away.

The standard library's server carries it (flask is not a dependency). Every reply is JSON (or an
event stream), errors included: the library's own HTML error pages are replaced. A body is read
whole before any reply, so the next request on a kept-alive connection starts at its first byte;
a body that cannot be read safely (no or a bad Content-Length, too large, chunked) gets its error
and the connection is closed.
"""

from __future__ import annotations

import json
import select
import socket
from http.server import BaseHTTPRequestHandler
from typing import Optional

MAX_BODY_BYTES = 1 << 20


class HTTPError(Exception):
    """An error reply: status, message, and the request field it is about (if one)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class JSONHandler(BaseHTTPRequestHandler):
    """Body reading and JSON / event-stream writing; subclasses route (``route``) and shape
    errors (``error_body``)."""

    protocol_version = "HTTP/1.1"
    server_version = "megatron-flextron"

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def route(self, method: str, path: str) -> None:
        raise NotImplementedError

    def error_body(self, error: HTTPError) -> dict:
        return {"error": {"message": error.message, "type": error.kind, "param": error.param,
                          "code": None}}

    def _dispatch(self, method: str) -> None:
        self.streaming = False
        try:
            self.route(method, self.path.split("?", 1)[0].rstrip("/") or "/")
        except HTTPError as e:
            self._fail(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug: the client gets a 500 with what it was, never a reset
            self._fail(HTTPError(500, f"{type(e).__name__}: {e}", kind="server_error"))

    def _fail(self, error: HTTPError) -> None:
        if self.streaming:  # headers are out: end the stream with the error, then close
            try:
                self.send_event(self.error_body(error))
                self.end_stream()
            except OSError:
                pass
            self.close_connection = True
            return
        try:
            self.send_json(error.status, self.error_body(error))
        except OSError:
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """The library's own errors (bad request line, unsupported method): JSON, then close."""
        self.close_connection = True
        try:
            self.send_json(code, self.error_body(HTTPError(code, message or explain or "error")))
        except OSError:
            pass

    # ---- request ---------------------------------------------------------------------------
    def read_json(self) -> dict:
        """The body as a JSON object. Length problems close the connection (nothing to skip)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise HTTPError(411, "chunked request bodies are not accepted: send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            raise HTTPError(411, "Content-Length is required")
        if not raw.strip().isdigit():
            self.close_connection = True
            raise HTTPError(400, f"Content-Length must be a non-negative integer, got {raw!r}")
        length = int(raw)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise HTTPError(413, f"request body of {length} bytes is over {MAX_BODY_BYTES}")
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            raise HTTPError(400, "the request body is shorter than its Content-Length")
        try:
            body = json.loads(data or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return body

    def client_gone(self) -> bool:
        """True once the client closed its side (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # ---- reply -----------------------------------------------------------------------------
    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def start_stream(self) -> None:
        """200 with a chunked ``text/event-stream`` body (the connection stays usable)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.streaming = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def send_event(self, payload: dict) -> None:
        self._chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def end_stream(self) -> None:
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self.streaming = False

    def log_message(self, fmt, *args):  # quiet: clients get every error in the reply
        pass

"""The server's public gRPC and HTTP ports: a thin front that refuses an oversized request before reading it.

tritonserver 2.51 receives a whole gRPC message (its limit is 2 GiB, with no flag to lower it) and a whole
HTTP body before any model sees it, so a 100 MiB request costs the server 100 MiB or more before our
checks refuse it. The gateway listens on the ports clients use and forwards to tritonserver on loopback:
- gRPC: every method is passed through as raw bytes (no protobuf parsing, streams included, metadata such
  as the admin header kept); a message over `max_request_bytes` is refused by gRPC itself from the
  message's length prefix, with RESOURCE_EXHAUSTED, before its body is read.
- HTTP: a body over the limit is refused from its Content-Length (413), one without a length (chunked)
  is refused (411); the rest (health, metadata, KServe inference) is forwarded.
While tritonserver restarts (`caphuman serve` heals a dead model process), the gateway keeps listening and
answers UNAVAILABLE / 503, so readiness probes see the outage.
"""
from __future__ import annotations

import http.client
import http.server
import json
import logging
import socket
import threading
from concurrent import futures

log = logging.getLogger(__name__)

# Room for the request's fields beside its photos (prompts, controls, JSON), in the gRPC message limit.
FIELD_ALLOWANCE_BYTES = 1 << 20
NO_DEADLINE = 1e9  # seconds: a time_remaining() above it means the call has no deadline
# Headers that describe one HTTP hop, not the request (RFC 9110, 7.6.1): never forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}


def message_limit(max_request_bytes: int) -> int:
    """The largest message (gRPC) or body (HTTP) the gateway lets through."""
    return max_request_bytes + FIELD_ALLOWANCE_BYTES


class _GrpcForwarder:
    """A generic gRPC handler: each call, whatever its method and kind, becomes a stream of raw messages
    to the same method upstream (unary calls are one-message streams on the wire)."""

    def __init__(self, channel):
        import grpc
        self._grpc = grpc
        self._channel = channel

    def service(self, details):
        grpc = self._grpc
        method = details.method
        metadata = tuple((k, v) for k, v in details.invocation_metadata
                         if not k.startswith((":", "grpc-")) and k not in ("user-agent", "content-type", "te"))

        def forward(requests, context):
            upstream = self._channel.stream_stream(method)  # no (de)serializers: bytes in, bytes out
            remaining = context.time_remaining()  # about 2**63 ns when the client set no deadline
            call = upstream(requests, metadata=metadata, timeout=remaining if remaining < NO_DEADLINE else None)
            context.add_callback(call.cancel)  # the client went away: stop the work upstream
            try:
                for response in call:
                    yield response
            except grpc.RpcError as e:
                if context.is_active():
                    code = e.code()
                    if code == grpc.StatusCode.UNAVAILABLE:
                        context.abort(code, "the model server is not running (restarting?): retry shortly")
                    context.abort(code, e.details() or code.name)

        return grpc.stream_stream_rpc_method_handler(forward)


class _HttpForwarder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]          # set on the per-gateway subclass
    max_body: int

    def log_message(self, fmt, *args):  # the access log would be one line per probe
        log.debug("http %s", fmt % args)

    def _refuse(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")  # the unread body must not be taken for the next request
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _forward(self) -> None:
        length = self.headers.get("Content-Length")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._refuse(411, "send a Content-Length (chunked bodies are not accepted)")
        try:
            size = int(length) if length is not None else 0
        except ValueError:
            return self._refuse(400, f"bad Content-Length {length!r}")
        if size < 0:
            return self._refuse(400, f"bad Content-Length {length!r}")
        if size > self.max_body:
            return self._refuse(413, f"the request is {size} bytes, over this server's limit of {self.max_body} "
                                     "bytes (max_request_bytes; docs/serving.md, \"Limits\")")
        body = self.rfile.read(size) if size else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        conn = http.client.HTTPConnection(*self.upstream, timeout=600)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:
            return self._refuse(503, "the model server is not running (restarting?): retry shortly")
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _forward


class Gateway:
    """gRPC and HTTP listeners on (host, grpc_port / http_port) in front of tritonserver's loopback ports."""

    def __init__(self, host: str, grpc_port: int, http_port: int, upstream_grpc_port: int,
                 upstream_http_port: int, max_request_bytes: int, workers: int = 128):
        self.host, self.grpc_port, self.http_port = host, grpc_port, http_port
        self.upstream_grpc_port, self.upstream_http_port = upstream_grpc_port, upstream_http_port
        self.limit = message_limit(max_request_bytes)
        self.workers = workers
        self._grpc_server = self._channel = self._http_server = self._http_thread = None

    @staticmethod
    def _bind_address(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> "Gateway":
        import grpc
        unlimited = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self._channel = grpc.insecure_channel(f"127.0.0.1:{self.upstream_grpc_port}", options=unlimited)
        self._grpc_server = grpc.server(
            futures.ThreadPoolExecutor(self.workers, thread_name_prefix="gateway-grpc"),
            handlers=[_GrpcForwarder(self._channel)],
            maximum_concurrent_rpcs=self.workers,  # beyond it: RESOURCE_EXHAUSTED at once, not a hung stream
            options=[("grpc.max_receive_message_length", self.limit), ("grpc.max_send_message_length", -1),
                     ("grpc.so_reuseport", 0)])
        if not self._grpc_server.add_insecure_port(self._bind_address(self.host, self.grpc_port)):
            raise OSError(f"cannot listen on {self.host}:{self.grpc_port} (gRPC): port in use?")
        self._grpc_server.start()
        handler = type("Forwarder", (_HttpForwarder,), {"upstream": ("127.0.0.1", self.upstream_http_port),
                                                        "max_body": self.limit})
        server_class = type("Server", (http.server.ThreadingHTTPServer,),
                            {"address_family": socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                             "daemon_threads": True})
        try:
            self._http_server = server_class((self.host, self.http_port), handler)
        except OSError as e:
            self._grpc_server.stop(None)
            raise OSError(f"cannot listen on {self.host}:{self.http_port} (HTTP): {e.strerror}") from None
        self._http_thread = threading.Thread(target=self._http_server.serve_forever, name="gateway-http",
                                             daemon=True)
        self._http_thread.start()
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self._grpc_server is not None:
            self._grpc_server.stop(grace).wait()
            self._grpc_server = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

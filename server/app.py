"""``brts serve``: the gRPC server around a ``TeacherRuntime``: limits, TLS + bearer token, health, reflection,
a start-up probe before SERVING (``probe.py``; the port is bound first and early calls wait), and a clean stop
(drain the calls in flight, then close the cache) on SIGTERM/SIGINT.

Security rule: 127.0.0.1 by default; any other bind address needs TLS and a token (``ServerConfig.check``).
The token is compared in constant time on every call and never logged.
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from brts.proto import teacher_pb2
from brts.server.metrics import ServerMetrics
from brts.server.probe import probe_teacher
from brts.server.runtime import TeacherRuntime, build_runtime
from brts.server.service import TeacherService
from brts.server.wire import serialize_reply
from brts.shared.config import ServerConfig, is_loopback

log = logging.getLogger("brts.serve")
SERVICE_NAME = teacher_pb2.DESCRIPTOR.services_by_name["TeacherService"].full_name
# One streamed message is one prompt: 5 candidates x 8,192 tokens x K=64 x 8 B is ~21 MB; a Score request of
# 64 sequences x 8,192 tokens x K=16 int32 candidate ids is ~34 MB.
MAX_SEND_BYTES = 64 << 20
MAX_RECEIVE_BYTES = 256 << 20
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.so_reuseport", 0),
]


def read_token(path: str | Path) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"token_file: {path} is empty; put the bearer token clients must send in it")
    return token


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Every call must carry ``authorization: Bearer <token>``; others get UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(sent).encode(), self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None

        def deny(request: Any, context: Any) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (authorization metadata)")

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                deny, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)


class _Undecodable:
    """A request body that is not the method's protobuf message. grpcio answers a raising deserializer with
    INTERNAL ("Exception deserializing request!"), which blames the server for the client's bytes; so the
    deserializer returns this instead and the handler refuses it with INVALID_ARGUMENT naming the message type."""

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return _Undecodable(f"request: not a valid {message_type.DESCRIPTOR.full_name} message ({exc})")
    return parse


def _unary(method: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return method(request, context)
    return handle


def _stream(method: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield from method(request, context)
    return handle


class ServiceGate:
    """Where calls wait while the teacher loads and runs its start-up probe.

    Why: the port is bound first (orchestrators see the process listening, and health NOT_SERVING, during a load
    that takes minutes on a GPU), yet a client that does "channel ready, then call" must keep working: its call
    waits here within its own deadline and is served once the probe passed, or gets UNAVAILABLE with the
    probe's reason if it failed."""

    def __init__(self) -> None:
        self._settled = threading.Event()
        self.service: TeacherService | None = None
        self.failure: str | None = None

    def open(self, service: TeacherService) -> None:
        self.service = service
        self._settled.set()

    def fail(self, reason: str) -> None:
        self.failure = reason
        self._settled.set()

    def wait(self, context: grpc.ServicerContext) -> TeacherService:
        if not self._settled.wait(context.time_remaining()):  # None: no deadline, wait until settled
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the teacher is still starting (loading the model and "
                                                             "running its start-up probe); wait for health SERVING")
        if self.failure is not None or self.service is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the teacher failed to start: {self.failure}")
        assert self.service is not None
        return self.service


def _add_service(gate: ServiceGate, server: grpc.Server, metrics: ServerMetrics) -> None:
    """``add_TeacherServiceServicer_to_server`` with three changes: every call first waits at the ``gate``;
    GetCandidates' serializer lets the pre-encoded replies of ``wire.encode_prompt`` through (generated code cannot
    be edited; it is regenerated); and bytes that are not the request message get INVALID_ARGUMENT instead of
    grpcio's INTERNAL. Each call is counted in ``metrics``."""
    handlers = {
        "GetCandidates": grpc.unary_stream_rpc_method_handler(
            metrics.stream("GetCandidates", _stream(lambda r, c: gate.wait(c).GetCandidates(r, c))),
            request_deserializer=_lenient(teacher_pb2.CandidatesRequest), response_serializer=serialize_reply),
        "Score": grpc.unary_unary_rpc_method_handler(
            metrics.unary("Score", _unary(lambda r, c: gate.wait(c).Score(r, c))),
            request_deserializer=_lenient(teacher_pb2.ScoreRequest),
            response_serializer=teacher_pb2.ScoreReply.SerializeToString),
        "Info": grpc.unary_unary_rpc_method_handler(
            metrics.unary("Info", _unary(lambda r, c: gate.wait(c).Info(r, c))),
            request_deserializer=_lenient(teacher_pb2.InfoRequest),
            response_serializer=teacher_pb2.InfoReply.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class RunningServer:
    """The gRPC server of one teacher: bound and started before the teacher is ready (health NOT_SERVING, calls
    wait at the gate), then ``attach(runtime)`` serves it (SERVING). ``port`` is the bound one (``port=0`` picks
    a free port)."""

    def __init__(self, config: ServerConfig, max_workers: int = 32, window_s: float | None = None,
                 metrics: ServerMetrics | None = None) -> None:
        cfg = config
        interceptors = [BearerTokenInterceptor(read_token(cfg.token_file))] if cfg.token_file else []
        self.config, self.window_s = config, window_s
        self.runtime: TeacherRuntime | None = None
        self.service: TeacherService | None = None
        self.gate = ServiceGate()
        self.metrics = metrics or ServerMetrics()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="brts-rpc"),
                                  options=GRPC_OPTIONS, interceptors=interceptors)
        _add_service(self.gate, self.server, self.metrics)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{cfg.host}:{cfg.port}" if ":" not in cfg.host else f"[{cfg.host}]:{cfg.port}"
        if cfg.tls_cert and cfg.tls_key:
            creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"port: cannot bind {address} (in use, or not an address of this machine)")
        self.address = f"{cfg.host}:{self.port}"
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status: Any) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> "RunningServer":
        """Accept connections (calls wait at the gate until ``attach`` or ``fail``)."""
        self.server.start()
        return self

    def attach(self, runtime: TeacherRuntime) -> "RunningServer":
        """Serve ``runtime`` (its probe passed): open the gate, health SERVING."""
        self.runtime = runtime
        self.metrics.instrument(runtime)
        self.service = TeacherService(runtime, self.window_s, self.metrics)
        self.gate.open(self.service)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        return self

    def fail(self, reason: str, grace_s: float = 5.0) -> None:
        """The teacher cannot serve: waiting calls get UNAVAILABLE with ``reason``, then the server stops."""
        self.gate.fail(reason)
        self.server.stop(grace_s).wait()

    def stop(self, grace_s: float = 30.0) -> None:
        """Refuse new calls, let the ones in flight finish (up to ``grace_s``), then close workers and the cache."""
        self.health.enter_graceful_shutdown()
        if self.service is None:
            self.gate.fail("the server is stopping")
        self.server.stop(grace_s).wait()
        if self.service is not None:
            self.service.close()
        if self.runtime is not None:
            self.runtime.close()


def _load_and_probe(config: ServerConfig, teacher_override: str | None, running: RunningServer,
                    echo: Callable[[str], None]) -> TeacherRuntime:
    """Build the runtime and probe it. On any failure the calls waiting at the gate get UNAVAILABLE with the
    reason, everything started is closed (engine, verifier workers, cache, the gRPC server), and the error is
    raised for the command to print as its one line."""
    runtime: TeacherRuntime | None = None
    try:
        runtime = build_runtime(config, teacher_override)
        report = probe_teacher(runtime, config.probe_timeout_s)
        runtime.apply_probe(report)
    except BaseException as exc:
        running.fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        if runtime is not None:
            runtime.close()
        raise
    running.attach(runtime)
    echo(f"brts serve: {report.line()}")
    echo(f"brts serve: {report.mode_line()}")
    return runtime


def serve(config: ServerConfig, teacher_override: str | None = None,
          echo: Callable[[str], None] = print, stop_event: threading.Event | None = None) -> None:
    """Bind (health NOT_SERVING), load the teacher, probe it, then serve (SERVING) until SIGTERM/SIGINT (or
    ``stop_event``). "listening on" is printed once calls can succeed."""
    metrics = ServerMetrics()
    # before the gRPC port: a metrics port in use fails with nothing else started
    metrics_http = _serve_metrics(config, metrics, echo) if config.metrics_port else None
    try:
        _serve(config, teacher_override, echo, stop_event, metrics)
    finally:
        if metrics_http is not None:
            metrics_http.shutdown()


def _serve_metrics(config: ServerConfig, metrics: ServerMetrics, echo: Callable[[str], None]) -> Any:
    tls = not is_loopback(config.metrics_host)  # ServerConfig.check made sure a certificate is there
    try:
        http = metrics.serve(config.metrics_host, config.metrics_port, config.tls_cert if tls else None,
                             config.tls_key if tls else None)
    except OSError as exc:
        raise OSError(f"metrics_port: cannot serve metrics on {config.metrics_host}:{config.metrics_port} "
                      f"({exc.strerror or exc}); pick a free port, or 0 for no metrics") from None
    scheme = "https" if tls else "http"
    echo(f"brts serve: metrics at {scheme}://{config.metrics_host}:{config.metrics_port}/metrics")
    return http


def _serve(config: ServerConfig, teacher_override: str | None, echo: Callable[[str], None],
           stop_event: threading.Event | None, metrics: ServerMetrics) -> None:
    running = RunningServer(config, metrics=metrics).start()
    echo(f"brts serve: bound {running.address}; loading the teacher (health NOT_SERVING until its start-up probe "
         "passes; calls made meanwhile wait)")
    runtime = _load_and_probe(config, teacher_override, running, echo)
    entries = runtime.cache.entry_count()
    tls = "TLS + token" if config.tls_cert else ("token" if config.token_file else "plaintext, loopback")
    echo(f"brts serve: teacher {runtime.fingerprint} ({runtime.engine.name}, {config.model}, {runtime.dtype}); "
         f"cache {config.cache_dir} ({entries} entries); {tls}")
    echo(f"brts serve: listening on {running.address}")
    done = stop_event or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: done.set())
    try:
        done.wait()
    finally:
        echo("brts serve: stopping: draining calls in flight, then closing the cache")
        running.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        p, c = runtime.pipeline, runtime.cache
        scores = running.service.scores.calls if running.service is not None else 0
        echo(f"brts serve: stopped (generated {c.generated} entries in {p.engine_calls} engine calls, "
             f"rescored {c.rescored}, {scores} score batches)")

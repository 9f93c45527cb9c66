"""How one HTTP connection reaches one service.

- :class:`LocalLink`: in this process, without a network round trip. The HTTP connection gets
  what an rpyc client gets: an admission slot of the service (its connection limits and the
  shared login throttle), its service instance (``services.<name>.instance``) with
  ``on_connect``/``on_disconnect`` called with a stand-in connection whose ``_config`` carries
  the connection id, endpoints, credentials and the connection's budget account; each call is
  counted in flight (so a graceful stop waits for it), timed for ``/metrics``, logged with the
  connection's id and peer, and a service's exception is logged as the rpyc path logs it; with
  tracing on, each call is a SERVER span, child of the request's W3C ``traceparent`` header.
- :class:`RemoteLink`: an rpyc connection to the service's own listener (``rpyc_host.wire.dial``:
  TLS, the token handshake, a tuned channel), for services on the ``forking`` server, whose
  per-connection process isolation an in-process call would lose.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .. import logs
from ..budget import CONFIG_KEY
from ..errors import Refused
from ..exposure import EXPOSED_PREFIX
from ..instances import CALL, call_target, connection_root
from ..servers.base import format_peer
from ..wire import DialError, dial, is_remote, tracing
from ..wire.context import CallContext
from ..wire.context import current as current_context
from ..wire.context import use as use_context
from .calls import SERVER_ERROR, UNAVAILABLE, Method, RPCError, describe_exception

_ROUTINE = (ValueError, TypeError, LookupError, OSError, AttributeError)


class StandInConnection:
    """What a service's ``on_connect`` sees of a gateway client: ``_config`` as rpyc's has it."""

    closed = False

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config


class LocalLink:
    """Calls one service in this process on behalf of one HTTP connection; see the module docstring."""

    def __init__(
        self,
        hosted: Any,
        peer: tuple[str, int],
        local: tuple[str, int],
        credentials: dict[str, Any] | None,
        calls: Any,
        trace: Callable[[], tuple[str | None, str | None]] = lambda: (None, None),
    ) -> None:
        server = hosted.server
        self.trace = trace  # the current request's (traceparent, tracestate)
        self.name = hosted.config.name
        self.server = server
        self.peer = peer
        self.calls = calls  # a rpyc_host.metrics.CallBook, or None
        self.logger: logging.Logger = server.logger
        try:
            server._admit(peer)
        except Refused as refusal:
            raise RPCError(UNAVAILABLE, f"service {self.name!r} is unavailable: {refusal.message}") from None
        self.connid = server._new_connid()
        self.peer_text = format_peer(peer)
        self.account = server.ledger.open_account(self.connid)
        self.conn = StandInConnection(
            {
                "connid": self.connid,
                "endpoints": (local, peer),
                "credentials": credentials,
                "logger": self.logger,
                "host_service": self.name,
                CONFIG_KEY: self.account,
            }
        )
        self.instance = connection_root(hosted.service, hosted.config.instance)
        self.per_call = hosted.config.instance == CALL
        self._bound: dict[str, tuple[Any, str]] = {}  # method -> (bound method, name for metrics)
        self._connected = False
        try:
            with logs.connection_context(self.connid, self.peer_text):
                self.instance.on_connect(self.conn)
        except Exception as exc:
            self.logger.warning("[%s] on_connect failed for a gateway client", self.connid, exc_info=True)
            self._settle()
            kind, message = describe_exception(exc)
            raise RPCError(UNAVAILABLE, f"service {self.name!r} is unavailable: {message}", kind) from None
        self._connected = True

    def call(self, method: Method, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = self._bound.get(method.name)
        if bound is None:
            func = getattr(self.instance, EXPOSED_PREFIX + method.name)
            bound = self._bound[method.name] = (func, getattr(func, "__name__", method.name))
        func = bound[0]
        if self.per_call:  # services.<name>.instance: call
            func = call_target(self.instance, func)
        context = logs.CONTEXT
        previous = context.connid, context.peer
        context.connid, context.peer = self.connid, self.peer_text
        tracker = self.server.tracker
        tracker.enter()
        started = time.perf_counter()
        failed = True
        try:
            if tracing.active():
                parent, state = self.trace()
                with tracing.span("server", self.name, method.name, parent, state) as span:
                    # Calls the method makes are children of this span, within the same deadline.
                    mine = tracing.headers_of(span)
                    base = current_context() or CallContext()
                    token = tracing.attach(span)  # the service's own spans are its children
                    try:
                        with use_context(replace(base, traceparent=mine[0], tracestate=mine[1])):
                            result = func(*args, **kwargs)
                    finally:
                        tracing.detach(token)
            else:
                result = func(*args, **kwargs)
            failed = False
            return result
        except Exception as exc:
            # Routine errors (bad arguments, missing files) keep their tracebacks at DEBUG,
            # unexpected ones at WARNING: the log has what the client is not shown.
            level = logging.DEBUG if isinstance(exc, _ROUTINE) else logging.WARNING
            self.logger.log(
                level, "[%s] call failed: %s: %s", self.connid, type(exc).__name__, exc, exc_info=True
            )
            kind, message = describe_exception(exc)
            raise RPCError(SERVER_ERROR, message, kind) from None
        finally:
            tracker.exit()
            if self.calls is not None:
                self.calls.record(self.name, bound[1], time.perf_counter() - started, failed)
            context.connid, context.peer = previous

    def close(self) -> None:
        """``on_disconnect``, then the account and the admission slot go back."""
        if self._connected:
            self._connected = False
            try:
                with logs.connection_context(self.connid, self.peer_text):
                    self.instance.on_disconnect(self.conn)
            except Exception:
                self.logger.warning("[%s] on_disconnect failed", self.connid, exc_info=True)
            finally:
                self._settle()

    def _settle(self) -> None:
        self.account.close()
        self.server._release(self.peer)


class RemoteLink:
    """An rpyc connection to a service's own listener; see the module docstring."""

    def __init__(
        self,
        name: str,
        address: tuple[str, int],
        timeout: float,
        token: str | None,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.name = name
        try:
            self.conn = dial(*address, timeout=timeout, retries=1, token=token, tls=tls, name=name)
        except DialError as exc:
            raise RPCError(
                UNAVAILABLE, f"service {name!r} is unavailable: {exc}", type(exc).__name__
            ) from None
        self.root = self.conn.root
        self._bound: dict[str, Any] = {}
        self.broken = False

    def call(self, method: Method, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = self._bound.get(method.name)
        try:
            if bound is None:
                bound = self._bound[method.name] = getattr(self.root, method.name)
            return bound(*args, **kwargs)
        except Exception as exc:
            kind, text = describe_exception(exc)
            if is_remote(exc) or not isinstance(exc, EOFError | ConnectionError | TimeoutError):
                raise RPCError(SERVER_ERROR, text, kind) from None
            # The connection is gone or stuck; the call is not retried (it may have run).
            self.broken = True
            if isinstance(exc, TimeoutError):
                raise RPCError(SERVER_ERROR, f"{method.full_name}: no reply in time ({text})", kind) from None
            raise RPCError(
                UNAVAILABLE, f"{method.full_name}: connection to the service lost ({text})", kind
            ) from None

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass

"""What the client library raises.

    ClientError                           base of everything raised here on purpose
    ├── ConfigError (ValueError)          a wrong service name, config file or argument: what to pass
    ├── ConnectError (ConnectionError)    no connection could be made: where and why
    │   ├── AuthError (ConnectionRefusedError)
    │   │                                 the server refused this client's token or certificate
    │   └── NoInstanceError               no instance of a pooled service answered
    ├── IngestError                       a batch could not be delivered
    │   ├── BatchRejected                 the service refused the whole batch: retrying cannot help
    │   └── DeliveryError                 not delivered and no spool file to keep it in
    └── TransferError                     a file transfer went wrong
        └── ChecksumError (ValueError)    the bytes that arrived are not the bytes that were sent

Beside it, from the wire layer below: ``DeadlineExceeded`` (a ``TimeoutError``): a call's
deadline passed, before it was sent, while waiting, or at the service on arrival (which then
did not start it). ``client.deadline(seconds)`` sets one for the calls in a block.

Errors a *service* raised (``ValueError``, ``FileNotFoundError`` ...) are not in this tree: they
arrive as their own type with the service's message and nothing else (no remote traceback text);
:func:`is_remote` tells them apart, :func:`describe_error` gives the ``Type: message`` line.
"""

from __future__ import annotations

from rpyc_host.wire.errors import DeadlineExceeded
from rpyc_host.wire.remote import describe as describe_error
from rpyc_host.wire.remote import is_remote

__all__ = [
    "AuthError",
    "BatchRejected",
    "ChecksumError",
    "ClientError",
    "ConfigError",
    "ConnectError",
    "DeadlineExceeded",
    "DeliveryError",
    "IngestError",
    "NoInstanceError",
    "TransferError",
    "describe_error",
    "is_remote",
]


class ClientError(Exception):
    """Base of the client library's own errors."""


class ConfigError(ClientError, ValueError):
    """A service name, config file or argument the client cannot use; the message says the fix."""


class ConnectError(ClientError, ConnectionError):
    """No connection could be made to the service (after retries)."""


class AuthError(ConnectError, ConnectionRefusedError):
    """The server refused this client's credentials (a wrong token, a throttled address)."""


class NoInstanceError(ConnectError):
    """No instance of the service could be reached (none registered, or all failing)."""


class IngestError(ClientError):
    """Base of the errors the ingest collector raises."""


class BatchRejected(IngestError):
    """The service refused a whole batch (ValueError/TypeError); retrying cannot help."""


class DeliveryError(IngestError):
    """A batch could not be delivered and there is no spool file to keep it in."""


class TransferError(ClientError):
    """A file transfer failed in a way the service did not report itself."""


class ChecksumError(TransferError, ValueError):
    """The bytes that arrived are not the bytes that were sent."""

"""The wire: what travels between a host and its clients, used by both sides.

Nothing here imports the rest of the host, the services or the client; both stand on it.

- ``transport``: tuned socket streams and channels (TCP_NODELAY, gather writes, frame limits);
- ``handshake``: the token frames sent before rpyc starts, and the refusal answers;
- ``tls``: TLS contexts for servers and clients;
- ``remote``: errors from the other side with their own type and a clean message;
- ``dial``: connect with retries, TLS, token and a tuned channel;
- ``bulk``: the one-time side connection for file bytes (tickets, sending, receiving);
- ``jsonlines``: the JSON-lines payload encoder of ingest batches;
- ``errors``: the wire's exception tree.
"""

from .dial import dial
from .errors import CredentialsRefused, DialError, FrameTooLarge, PeerStalled, WireError
from .remote import WireConnection, describe, is_remote
from .tls import client_context, server_context

__all__ = [
    "CredentialsRefused",
    "DialError",
    "FrameTooLarge",
    "PeerStalled",
    "WireConnection",
    "WireError",
    "client_context",
    "describe",
    "dial",
    "is_remote",
    "server_context",
]

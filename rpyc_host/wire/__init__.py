"""The wire: what travels between a host and its clients, used by both sides.

Nothing here imports the rest of the host, the services or the client; both stand on it.

- ``transport``: tuned socket streams and channels (TCP_NODELAY, gather writes, frame limits);
- ``handshake``: the token frames sent before rpyc starts, and the refusal answers;
- ``tls``: TLS contexts for servers and clients;
- ``remote``: errors from the other side with their own type and a clean message, and the
  connection behaviour both ends share (call contexts out and in);
- ``context``: the call context (deadline, trace context, request id) that travels with calls;
- ``dial``: connect with retries, TLS, token and a tuned channel;
- ``streams``, ``stream_reader``: streamed results (the host's stream object, the client's
  chunked iterator);
- ``bulk``: the one-time side connection for file bytes (tickets, sending, receiving);
- ``bulktls``: TLS on that side connection (``ssl.SSLSocket``): a whole-handshake deadline and
  clear errors (a timeout named, "TLS record refused after N bytes");
- ``hashes``: the integrity hashes a file transfer can name (blake3, xxh3_128, sha256);
- ``jsonlines``: the JSON-lines payload encoder of ingest batches;
- ``errors``: the wire's exception tree.
"""

from . import context
from .dial import dial
from .errors import CredentialsRefused, DeadlineExceeded, DialError, FrameTooLarge, PeerStalled, WireError
from .remote import WireConnection, describe, is_remote
from .tls import client_context, server_context

__all__ = [
    "CredentialsRefused",
    "DeadlineExceeded",
    "DialError",
    "FrameTooLarge",
    "PeerStalled",
    "WireConnection",
    "WireError",
    "client_context",
    "context",
    "describe",
    "dial",
    "is_remote",
    "server_context",
]

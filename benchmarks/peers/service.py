"""The service every rpyc-based system in the peer benchmark serves, bare or through the host."""

import rpyc


@rpyc.service
class PeerService(rpyc.Service):
    @rpyc.exposed
    def add(self, a: int, b: int) -> int:
        return a + b

    @rpyc.exposed
    def put(self, chunk: bytes) -> int:
        """Take one piece of a bulk transfer and drop it; the length says it arrived whole."""
        return len(chunk)

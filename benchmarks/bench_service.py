"""The service every small-call benchmark serves, bare or through the host."""

import rpyc


@rpyc.service
class AddService(rpyc.Service):
    @rpyc.exposed
    def add(self, a: int, b: int) -> int:
        return a + b

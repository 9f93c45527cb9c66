"""The service every small-call benchmark serves, bare or through the host."""

import rpyc


@rpyc.service
class AddService(rpyc.Service):
    @rpyc.exposed
    def add(self, a: int, b: int) -> int:
        return a + b


@rpyc.service
class CountService(rpyc.Service):
    """A generator to iterate remotely, and this process's peak memory."""

    @rpyc.exposed
    def count(self, n: int):  # type: ignore[no-untyped-def]
        yield from range(n)

    @rpyc.exposed
    def peak_rss_kib(self) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return -1

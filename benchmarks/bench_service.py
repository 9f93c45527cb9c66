"""The service every small-call benchmark serves, bare or through the host."""

import rpyc


@rpyc.service
class AddService(rpyc.Service):
    @rpyc.exposed
    def add(self, a: int, b: int) -> int:
        return a + b


@rpyc.service
class TracedAddService(AddService):
    """``add``, in a host process whose tracing a benchmark switches between its slices, so
    every mode it compares is served by the same process."""

    @rpyc.exposed
    def switch_tracing(self, mode: str) -> bool:
        from benchmarks.harness import switch_tracing

        return switch_tracing(mode)


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

"""Free TCP ports for the tests that start a multi-machine job, so that two tests (two pytest-xdist workers, or
another program on the machine) never meet on the same port. Single-machine torchrun tests use `--standalone`,
which picks its own port."""

import socket


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct ports that were free a moment ago (the sockets stay open until all `n` are chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]

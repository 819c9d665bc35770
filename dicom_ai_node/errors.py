"""The node's one root exception: `NodeError`, an expected failure an admin can act on.

A bad configuration, a database not migrated, a port already in use, a
certificate that cannot be loaded, a secret missing from the environment: each
is a `NodeError` whose message is one sentence saying what is wrong and which
setting or command fixes it.  The CLI catches exactly this root, prints the
sentence and exits with status 2; any other exception is a bug and shows its
traceback.  One root, as procrastinate (`ProcrastinateException`) and SQLAlchemy
(`SQLAlchemyError`) keep one, lets a caller tell "the world is not as the node
needs it" from "the node is wrong" with a single `except`.

This module imports nothing of the node's, so every module may import it.
"""

from __future__ import annotations

import errno


class NodeError(Exception):
    """An expected failure, told to the admin in one sentence."""


class StartupError(NodeError):
    """The node cannot start: a port in use, a certificate or key that cannot be loaded, ..."""

    @classmethod
    def cannot_listen(cls, what: str, host: str, port: int, port_key: str, bind_key: str, exc: OSError) -> StartupError:
        """A listening socket that cannot be bound: which one, why, and the setting that chose it."""
        where = f"{what} port {host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            return cls(f"cannot start: {where} is in use ({port_key})")
        if exc.errno == errno.EACCES:
            return cls(f"cannot start: {where} is not allowed for this user; ports below 1024 need "
                       f"CAP_NET_BIND_SERVICE ({port_key})")
        if exc.errno == errno.EADDRNOTAVAIL:
            return cls(f"cannot start: {where}: {host} is not an address of this machine ({bind_key})")
        return cls(f"cannot start: {where} cannot listen: {exc.strerror or exc} ({port_key}, {bind_key})")

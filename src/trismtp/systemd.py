"""systemd's service notification protocol (``Type=notify``), without a dependency.

systemd gives a ``Type=notify`` service the address of a datagram socket in
``$NOTIFY_SOCKET``; the service sends ``READY=1`` once it accepts work and
``STOPPING=1`` when it begins to shut down, so ``systemctl start`` returns
only when trismtp is listening and dependent units start after it. The
protocol is one ``KEY=VALUE`` datagram per message (sd_notify(3)); an
address starting with ``@`` is in the Linux abstract namespace.

Without ``$NOTIFY_SOCKET`` (not under systemd) every call does nothing. A
failure to notify is logged, never fatal: the daemon works the same without
systemd's bookkeeping.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["notify"]

log = logging.getLogger("trismtp.daemon")

ENV = "NOTIFY_SOCKET"


def notify(*states: str) -> bool:
    """Send ``states`` (``"READY=1"``, ``"STATUS=…"``) to systemd; True if sent."""
    address = os.environ.get(ENV)
    if not address or not states:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode("utf-8"))
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ.get(ENV), exc)
        return False
    return True

"""WebSocket frame masking in C, for wsproto (both our clients and the service).

Why
---
RFC 6455 §5.3 makes a client XOR every byte it sends with a fresh random
4-byte key, and the server undo it. wsproto does this in Python
(``XorMaskerSimple``: four strided slices, four ``translate`` calls), about
1.7 ms per MB on this project's machines. The pusher and the embedded jobs
service run in one process (SPEC), so a 25 MB PushBatch was masked and
unmasked there: ~80 ms of CPU for one 10 MiB mail, the largest single share
of its cost. ``websockets`` ships the same operation as a small C function
(``websockets.speedups.apply_mask``, vectorised), ~40 times faster.

How
---
wsproto builds its masker by the module-global name ``XorMaskerSimple``, once
per frame it sends (client) and once per frame it receives (server).
:func:`install` replaces that name with :class:`FastMasker`, which has the
same interface and gives byte-identical output (``tests/test_wsmask.py``
checks that against wsproto's own class, and that wsproto still calls the
name on both paths, so an upgrade that bypasses it fails the tests rather
than quietly slowing down). Nothing else changes: the keys are still
wsproto's (``os.urandom(4)`` per frame), the frames the same bytes, so any
RFC 6455 peer interoperates exactly as before.

If the C function is not there (``websockets`` missing, or installed without
its compiled speedups), :func:`install` leaves wsproto as it is: the pure
Python fallback in ``websockets`` is slower than wsproto's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import wsproto.frame_protocol

__all__ = ["WSPROTO_MASKER", "FastMasker", "install", "installed", "mask"]

_apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes] | None
try:
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - the pinned wheel has it
    _apply_mask = None

#: wsproto's own masker (pure Python), as it was before :func:`install`.
WSPROTO_MASKER: Final[type] = wsproto.frame_protocol.XorMaskerSimple


class FastMasker:
    """XOR with a 4-byte key, continuing the key across calls (wsproto's interface).

    :meth:`process` is called with each piece of one frame's payload in
    turn; each piece starts where the previous one left the key.
    """

    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray | memoryview) -> bytes:
        """*data* XORed with the key, rotated to where the last piece ended.

        Returns bytes, not wsproto's bytearray: every caller in wsproto
        takes either (and ``bytes(payload)`` of bytes copies nothing).
        """
        assert _apply_mask is not None
        masked = _apply_mask(data, self._key)
        shift = len(masked) & 3
        if shift:
            self._key = self._key[shift:] + self._key[:shift]
        return masked


def mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """*data* XORed with the 4-byte *key* from its first byte (one frame's payload)."""
    if _apply_mask is not None:
        return _apply_mask(data, key)
    return bytes(WSPROTO_MASKER(key).process(bytearray(data)))  # pragma: no cover


def install() -> bool:
    """Make wsproto mask and unmask with :class:`FastMasker`; False if it cannot.

    Idempotent, and process-wide: every wsproto connection in the process
    uses it (the output is the same bytes, so that is harmless).
    """
    if _apply_mask is None:
        return False
    wsproto.frame_protocol.XorMaskerSimple = FastMasker  # type: ignore[misc,assignment]
    return True


def installed() -> bool:
    """Whether wsproto masks with :class:`FastMasker` now."""
    masker: type = wsproto.frame_protocol.XorMaskerSimple
    return masker is FastMasker

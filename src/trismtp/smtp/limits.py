"""Per-client-address connection limits, sans-io.

Theory of operation
===================

:class:`AddressLimits` answers one question when a connection arrives: may
this client address open another connection now? It enforces two limits,
each ``0`` for "no limit":

* ``max_concurrent`` connections open at once from one address;
* ``max_per_minute`` new connections from one address, as a token bucket:
  the bucket holds ``max_per_minute`` tokens, starts full, each admitted
  connection takes one, and it refills continuously at
  ``max_per_minute / 60`` tokens a second. So a burst of ``max_per_minute``
  connections is admitted at once, then one every ``60 / max_per_minute``
  seconds; over any interval of ``t`` seconds at most
  ``max_per_minute + t * max_per_minute / 60`` are admitted (up to
  floating-point rounding), and the long-run average is ``max_per_minute``
  a minute. This is a sliding window without a per-connection log: each
  address costs two numbers, the tokens missing from its bucket and when
  that was last worked out. (GCRA's single "full again at" timestamp would
  do too, but adding ``60 / max_per_minute`` to a large clock reading over
  and over drifts by rounding, enough to refuse the last connection of a
  burst; a burst counted in whole tokens is exact.)

The server calls :meth:`AddressLimits.open` on accept and, for every
connection it allowed, :meth:`AddressLimits.close` exactly once when the
connection ends. Time comes from an injectable clock, so tests run without
sleeping.

Memory is bounded even against a client with very many addresses. An
address with no open connection and a full bucket is indistinguishable from
one never seen, so its entry is dropped: at once on its last close, or else
by a sweep of the whole table that runs after as many :meth:`open` calls as
there are entries (so each call pays for one entry, amortised), and at most
once a second while the table is full. Rate state is kept for at most
``max_tracked`` addresses, so the table holds at most ``max_tracked``
entries plus one per address that has a connection open; see
:meth:`AddressLimits.open` for what happens beyond that.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable

__all__ = [
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_NEW_CONNECTIONS",
    "AddressLimits",
    "address_key",
]

TOO_MANY_CONNECTIONS = "too many connections from your address"
TOO_MANY_NEW_CONNECTIONS = "too many new connections from your address, slow down"

# While the table is full, sweep it at most this often (seconds), so a table
# kept full by an attacker costs one pass over it a second at most.
_FULL_SWEEP_INTERVAL = 1.0


# Worked out on every open and close: parsing the address costs more than
# the rest of the bookkeeping, and busy clients come back from few addresses.
@functools.lru_cache(maxsize=4096)
def address_key(address: str) -> str:
    """The key under which ``address`` (a plain IP, no port) is limited.

    An IPv4 address is its own key. IPv6 addresses are grouped by /64: a
    single host or home network is normally given a whole /64 and can pick
    any address in it, so per-address limits would not limit anyone. An
    IPv4-mapped IPv6 address (how a dual-stack socket reports IPv4 peers) is
    keyed as its IPv4 address, not lumped into one /64 with every other IPv4
    client. A string that is not an IP address is its own key.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"
    return str(ip)


class _Entry:
    """What we know about one key.

    ``missing`` is how many tokens the bucket lacked at time ``since``;
    ``since`` is ``None`` when the key has no rate state because the table
    was full when it arrived. ``open`` counts open connections, and is only
    kept when there is a concurrency limit.
    """

    __slots__ = ("missing", "open", "since")

    def __init__(self, since: float | None) -> None:
        self.open = 0
        self.missing = 0.0
        self.since = since


class AddressLimits:
    """Concurrency and rate limits per client address; see the module docstring.

    ``max_concurrent`` and ``max_per_minute`` are ``0`` for "no limit".
    ``max_tracked`` bounds how many keys get rate state.
    """

    def __init__(
        self,
        max_concurrent: int,
        max_per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = 100_000,
    ) -> None:
        if max_concurrent < 0 or max_per_minute < 0:
            raise ValueError("limits must be 0 (no limit) or positive")
        if max_tracked < 1:
            raise ValueError("max_tracked must be positive")
        self.max_concurrent = max_concurrent
        self.max_per_minute = max_per_minute
        self.max_tracked = max_tracked
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._opens_since_sweep = 0
        self._last_sweep = clock()

    def open(self, address: str) -> str | None:
        """Count a new connection from ``address`` if the limits allow it.

        Returns ``None`` when allowed (the caller must then :meth:`close` it
        exactly once), or the reason for a refusal, fit for an SMTP reply.

        A refused attempt changes nothing: it is not an open connection and
        takes no token. If refusals cost tokens, a client that retries faster
        than the bucket refills would keep it empty and lock itself out for
        as long as it keeps retrying, which is what a naive client does.

        A new address arriving while ``max_tracked`` or more addresses are
        tracked gets no rate state: its rate is not limited (fail open), but its
        concurrency is still counted, and its entry is dropped at its last
        close. Concurrency entries are bounded by the connections actually
        open, which the server pays for anyway; the rate state, which
        outlives connections, is what an attacker with many addresses could
        otherwise grow without bound, and refusing newcomers instead would
        let that attacker lock out every new client.
        """
        if not (self.max_concurrent or self.max_per_minute):
            return None
        now = self._clock()
        self._maybe_sweep(now)
        key = address_key(address)
        entry = self._entries.get(key)
        if entry is None:
            # A new key is always admitted: no connections, full bucket.
            rated = self.max_per_minute > 0 and len(self._entries) < self.max_tracked
            if not rated and not self.max_concurrent:
                return None
            entry = _Entry(now if rated else None)
            self._entries[key] = entry
        elif self.max_concurrent and entry.open >= self.max_concurrent:
            return TOO_MANY_CONNECTIONS
        if entry.since is not None:
            missing = self._missing(entry, now)
            if missing > self.max_per_minute - 1:  # not one whole token left
                return TOO_MANY_NEW_CONNECTIONS
            entry.missing = missing + 1
            entry.since = now
        if self.max_concurrent:
            entry.open += 1
        return None

    def close(self, address: str) -> None:
        """A connection that :meth:`open` allowed has ended.

        Closing an address with no open connection counted is a no-op.
        """
        if not self.max_concurrent:
            return
        key = address_key(address)
        entry = self._entries.get(key)
        if entry is None or entry.open == 0:
            return
        entry.open -= 1
        if self._idle(entry, self._clock()):
            del self._entries[key]

    def tracked(self) -> int:
        """How many keys have an entry (for tests and metrics)."""
        return len(self._entries)

    def _maybe_sweep(self, now: float) -> None:
        self._opens_since_sweep += 1
        size = len(self._entries)
        due = self._opens_since_sweep >= size or (
            size >= self.max_tracked and now - self._last_sweep >= _FULL_SWEEP_INTERVAL
        )
        if due:
            # Rebuilding, rather than deleting in place, also gives the memory
            # back: a dict never shrinks its table on deletion.
            self._entries = {
                key: entry for key, entry in self._entries.items() if not self._idle(entry, now)
            }
            self._opens_since_sweep = 0
            self._last_sweep = now

    def _missing(self, entry: _Entry, now: float) -> float:
        """Tokens missing from ``entry``'s bucket at ``now``, after the refill."""
        if entry.since is None:
            return 0.0
        refill = max(0.0, now - entry.since) * self.max_per_minute / 60.0
        return max(0.0, entry.missing - refill)

    def _idle(self, entry: _Entry, now: float) -> bool:
        """Whether ``entry`` says nothing that an absent entry would not."""
        return entry.open == 0 and self._missing(entry, now) == 0.0

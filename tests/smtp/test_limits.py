"""Tests for the per-address connection limits (``trismtp.smtp.limits``).

Time is a :class:`FakeClock` that the tests move by hand: nothing sleeps.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trismtp.smtp.limits import (
    TOO_MANY_CONNECTIONS,
    TOO_MANY_NEW_CONNECTIONS,
    AddressLimits,
    address_key,
)

A = "192.0.2.1"
B = "192.0.2.2"


def scale(n: int) -> int:
    return n * int(os.environ.get("TRISMTP_HYPOTHESIS_SCALE", "1"))


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def ipv4(n: int) -> str:
    """The ``n``-th IPv4 address, written out by hand because it is faster."""
    return f"{n >> 24 & 255}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


# -- concurrency -----------------------------------------------------------------


def test_concurrency_limit_and_release(clock: FakeClock) -> None:
    limits = AddressLimits(2, 0, clock=clock)
    assert limits.open(A) is None
    assert limits.open(A) is None
    assert limits.open(A) == TOO_MANY_CONNECTIONS
    assert limits.open(B) is None  # another address is not affected
    limits.close(A)
    assert limits.open(A) is None
    assert limits.open(A) == TOO_MANY_CONNECTIONS


def test_concurrency_entries_go_at_last_close(clock: FakeClock) -> None:
    limits = AddressLimits(2, 0, clock=clock)
    limits.open(A)
    limits.open(A)
    limits.open(B)
    assert limits.tracked() == 2
    limits.close(A)
    assert limits.tracked() == 2
    limits.close(A)
    limits.close(B)
    assert limits.tracked() == 0


def test_close_of_unknown_address_is_harmless(clock: FakeClock) -> None:
    limits = AddressLimits(1, 60, clock=clock)
    limits.close(A)
    limits.close("not an address")
    assert limits.tracked() == 0
    assert limits.open(A) is None
    limits.close(A)
    limits.close(A)  # one close too many: never negative
    assert limits.open(A) is None
    assert limits.open(A) == TOO_MANY_CONNECTIONS


# -- rate ------------------------------------------------------------------------


def test_burst_then_steady_rate(clock: FakeClock) -> None:
    limits = AddressLimits(0, 60, clock=clock)
    for _ in range(60):
        assert limits.open(A) is None
    assert limits.open(A) == TOO_MANY_NEW_CONNECTIONS
    assert limits.open(B) is None  # another address has its own bucket
    # Then one a second (60 a minute).
    for _ in range(10):
        clock.advance(0.5)
        assert limits.open(A) == TOO_MANY_NEW_CONNECTIONS
        clock.advance(0.5)
        assert limits.open(A) is None
        assert limits.open(A) == TOO_MANY_NEW_CONNECTIONS
    # A quiet minute refills the whole bucket, and no more than that.
    clock.advance(60)
    for _ in range(60):
        assert limits.open(A) is None
    assert limits.open(A) == TOO_MANY_NEW_CONNECTIONS


def test_slow_rate(clock: FakeClock) -> None:
    limits = AddressLimits(0, 4, clock=clock)  # a burst of 4, then one per 15 s
    for _ in range(4):
        assert limits.open(A) is None
    assert limits.open(A) == TOO_MANY_NEW_CONNECTIONS
    clock.advance(14.5)
    assert limits.open(A) == TOO_MANY_NEW_CONNECTIONS
    clock.advance(0.5)
    assert limits.open(A) is None
    clock.advance(30)
    assert limits.open(A) is None
    assert limits.open(A) is None
    assert limits.open(A) == TOO_MANY_NEW_CONNECTIONS


def test_refused_attempts_are_not_counted(clock: FakeClock) -> None:
    limits = AddressLimits(0, 60, clock=clock)
    for _ in range(60):
        limits.open(A)
    # A client hammering away while refused must not push its recovery back.
    for _ in range(1000):
        assert limits.open(A) == TOO_MANY_NEW_CONNECTIONS
        clock.advance(0.0009)
    # One second after the burst, as if the client had waited quietly.
    clock.advance(0.15)
    assert limits.open(A) is None


def test_concurrency_refusals_take_no_token(clock: FakeClock) -> None:
    limits = AddressLimits(1, 2, clock=clock)
    assert limits.open(A) is None
    for _ in range(10):
        assert limits.open(A) == TOO_MANY_CONNECTIONS
    limits.close(A)
    assert limits.open(A) is None  # the second token is still there
    limits.close(A)
    assert limits.open(A) == TOO_MANY_NEW_CONNECTIONS


def test_rate_refusals_open_nothing(clock: FakeClock) -> None:
    limits = AddressLimits(2, 1, clock=clock)
    assert limits.open(A) is None
    assert limits.open(A) == TOO_MANY_NEW_CONNECTIONS
    clock.advance(60)
    assert limits.open(A) is None  # the refusal did not count as open
    assert limits.open(A) == TOO_MANY_CONNECTIONS


@settings(max_examples=scale(300), deadline=None)
@given(
    per_minute=st.integers(1, 120),
    gaps=st.lists(st.floats(0, 30) | st.just(0.0), min_size=1, max_size=300),
)
def test_admissions_obey_the_documented_bound(per_minute: int, gaps: list[float]) -> None:
    # Over any interval of t seconds at most per_minute + t * per_minute / 60.
    clock = FakeClock()
    limits = AddressLimits(0, per_minute, clock=clock)
    admitted: list[float] = []
    for gap in gaps:
        clock.advance(gap)
        if limits.open(A) is None:
            admitted.append(clock.now)
    assert admitted  # the first is always admitted
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            span = admitted[j] - start
            assert j - i + 1 <= per_minute + span * per_minute / 60 + 1e-6


@settings(max_examples=scale(300), deadline=None)
@given(per_minute=st.integers(1, 120), rounds=st.integers(1, 5))
def test_a_client_at_the_rate_is_never_refused(per_minute: int, rounds: int) -> None:
    clock = FakeClock()
    limits = AddressLimits(0, per_minute, clock=clock)
    for _ in range(per_minute):
        assert limits.open(A) is None
    for _ in range(rounds * per_minute):
        clock.advance(60 / per_minute + 1e-9)
        assert limits.open(A) is None


# -- keys ------------------------------------------------------------------------


def test_ipv6_is_limited_per_64(clock: FakeClock) -> None:
    limits = AddressLimits(1, 0, clock=clock)
    assert limits.open("2001:db8:1:2::1") is None
    assert limits.open("2001:db8:1:2:ffff:ffff:ffff:ffff") == TOO_MANY_CONNECTIONS
    assert limits.open("2001:db8:1:3::1") is None  # the next /64 is someone else
    limits.close("2001:db8:1:2:aaaa::7")  # any address in the /64 closes
    assert limits.open("2001:db8:1:2::5") is None


def test_ipv6_rate_is_per_64(clock: FakeClock) -> None:
    limits = AddressLimits(0, 3, clock=clock)
    for host in range(1, 4):
        assert limits.open(f"2001:db8::{host}") is None
    assert limits.open("2001:db8::4") == TOO_MANY_NEW_CONNECTIONS
    assert limits.open("2001:db8:0:1::4") is None


def test_ipv4_is_limited_per_address(clock: FakeClock) -> None:
    limits = AddressLimits(1, 1, clock=clock)
    for host in range(256):
        assert limits.open(f"192.0.2.{host}") is None
    assert limits.open(A) == TOO_MANY_CONNECTIONS


def test_address_key() -> None:
    assert address_key("192.0.2.1") == "192.0.2.1"
    assert address_key("2001:DB8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2::") == "2001:db8:1:2::/64"
    assert address_key("::1") == "::/64"
    # A dual-stack socket's view of an IPv4 peer is that IPv4 address.
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("::ffff:192.0.2.2") == "192.0.2.2"
    assert address_key("/run/trismtp.sock") == "/run/trismtp.sock"
    assert address_key("") == ""


def test_unparseable_addresses_are_their_own_key(clock: FakeClock) -> None:
    limits = AddressLimits(1, 0, clock=clock)
    assert limits.open("unix:a") is None
    assert limits.open("unix:a") == TOO_MANY_CONNECTIONS
    assert limits.open("unix:b") is None


# -- no limits -------------------------------------------------------------------


def test_zero_means_unlimited(clock: FakeClock) -> None:
    limits = AddressLimits(0, 0, clock=clock)
    for _ in range(10_000):
        assert limits.open(A) is None
    assert limits.tracked() == 0
    limits.close(A)


def test_zero_concurrency_limits_only_the_rate(clock: FakeClock) -> None:
    limits = AddressLimits(0, 100, clock=clock)
    for _ in range(100):
        assert limits.open(A) is None  # all still open: no concurrency limit
    assert limits.open(A) == TOO_MANY_NEW_CONNECTIONS


def test_zero_rate_limits_only_concurrency(clock: FakeClock) -> None:
    limits = AddressLimits(1, 0, clock=clock)
    for _ in range(10_000):
        assert limits.open(A) is None
        limits.close(A)
    assert limits.tracked() == 0


@pytest.mark.parametrize(
    ("concurrent", "per_minute", "tracked"), [(-1, 0, 1), (0, -1, 1), (0, 0, 0), (1, 1, -5)]
)
def test_bad_arguments(concurrent: int, per_minute: int, tracked: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        AddressLimits(concurrent, per_minute, max_tracked=tracked)


# -- memory ----------------------------------------------------------------------


def test_idle_refilled_entries_are_pruned(clock: FakeClock) -> None:
    limits = AddressLimits(5, 60, clock=clock)
    for n in range(100):
        assert limits.open(ipv4(n)) is None
        limits.close(ipv4(n))
    held = "198.51.100.1"
    assert limits.open(held) is None
    # Closed, but the buckets are not full again yet: still needed.
    clock.advance(0.5)
    for _ in range(200):
        if limits.open(B) is None:
            limits.close(B)
    assert limits.tracked() == 102
    # Full again a second later: gone within as many opens as there are entries.
    clock.advance(1)
    for _ in range(200):
        if limits.open(B) is None:
            limits.close(B)
    assert limits.tracked() == 2  # B (bucket not full) and the held connection
    # The held connection is still counted although its bucket is full.
    for _ in range(4):
        assert limits.open(held) is None
    assert limits.open(held) == TOO_MANY_CONNECTIONS


def test_entry_goes_at_last_close_once_refilled(clock: FakeClock) -> None:
    limits = AddressLimits(5, 60, clock=clock)
    limits.open(A)
    limits.open(A)
    clock.advance(5)
    limits.close(A)
    assert limits.tracked() == 1
    limits.close(A)
    assert limits.tracked() == 0


def test_max_tracked_holds_against_many_addresses(clock: FakeClock) -> None:
    limits = AddressLimits(3, 10, clock=clock, max_tracked=1000)
    most = 0
    for n in range(200_000):
        address = ipv4(0x0A000000 + n)
        assert limits.open(address) is None  # new addresses are always let in
        limits.close(address)
        most = max(most, limits.tracked())
        if n % 1000 == 0:
            clock.advance(0.01)
    assert most <= 1000

    # With the table full, a newcomer has no rate state (fail open) but its
    # concurrency is still counted.
    assert limits.tracked() == 1000
    for _ in range(50):
        assert limits.open(A) is None
        limits.close(A)
    for _ in range(3):
        assert limits.open(A) is None
    assert limits.open(A) == TOO_MANY_CONNECTIONS
    for _ in range(3):
        limits.close(A)

    # Once the old entries are full again, the table empties and newcomers
    # are rate limited again.
    clock.advance(60)
    limits.open(B)
    limits.close(B)
    assert limits.tracked() <= 2
    for _ in range(10):
        assert limits.open(A) is None
        limits.close(A)
    assert limits.open(A) == TOO_MANY_NEW_CONNECTIONS


def test_entries_beyond_max_tracked_are_only_open_connections(clock: FakeClock) -> None:
    limits = AddressLimits(3, 10, clock=clock, max_tracked=100)
    addresses = [ipv4(0x0A000000 + n) for n in range(1000)]
    for address in addresses:
        assert limits.open(address) is None
    # Past max_tracked, an entry exists only while a connection is open ...
    assert limits.tracked() == 1000
    for address in addresses:
        limits.close(address)
    # ... and goes with it, leaving at most max_tracked.
    assert limits.tracked() <= 100


def test_no_entries_when_there_is_nothing_to_count(clock: FakeClock) -> None:
    # No concurrency limit and a full table: a newcomer needs no entry at all.
    limits = AddressLimits(0, 10, clock=clock, max_tracked=10)
    for n in range(1000):
        assert limits.open(ipv4(n)) is None
    assert limits.tracked() == 10

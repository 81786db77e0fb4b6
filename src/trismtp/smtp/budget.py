"""The memory budget: one bound on what the messages in flight cost.

Theory of operation
===================

A message costs memory from its first DATA octet until its reply is sent:
the bytes as received, the parse, the decoded parts, the job's JSON, the
batch on the wire and (with the embedded jobs service) the same JSON decoded
again in this process. Measured end to end, the peak of that is about
:data:`COST_FACTOR` times the message's size (docs/guarantees.md gives the
figures), whatever stage it is in. So a session *claims* ``cost(octets)``
before it holds the octets, and keeps the claim until its transaction ends
(reply sent, RSET, connection closed).

Claims are all or nothing, which is what keeps sessions from deadlocking:

* at MAIL with ``SIZE=n``, the session claims ``cost(n)``; at DATA without
  one, ``cost(SMALL_OCTETS)``. If that does not fit now, the command gets
  ``452 4.3.1`` and the client retries later, before it uploaded anything.
* a message that outgrows its claim (no ``SIZE=``, or a wrong one) gives the
  claim back and waits for ``cost`` of its next step: :data:`FIRST_STEP`
  (256 KiB), then twice the last, up to the largest message it may still
  become (``max_message_size``). So past its first step a claim is never
  more than twice what the message has reached. Meanwhile the session does
  not read: TCP pushes back on the client.
* at the final dot the message's size is known: a claim larger than its
  ``cost`` (a step not filled, a ``SIZE=`` larger than what came) shrinks to
  it, and waiting sessions may take the rest while the message is pushed.

So a session that waits holds no claim, and every session that holds one
can finish its step without waiting: nothing is claimed after the final dot.
What a waiting session does hold are the octets it has read (at most its
last step and a read): they are *parked*, and parked octets are bounded too,
by ``park_limit`` (a quarter of the budget). A session that would pass it is
not made to wait: it gets ``421 4.3.1`` and its MTA retries. So the memory
of messages is bounded by ``total + park_limit``.

Small mail is not starved by big uploads (say, hundreds of clients that
upload megabytes and never send the final dot): a claim larger than
``cost(SMALL_OCTETS)`` is *large*, and large claims together may use the
budget only up to ``total - reserve``. The reserve is left to small ones.

The budget is pure bookkeeping with a trio event to wake waiters: no clocks,
no sockets; the server decides how long a session may wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import trio

__all__ = [
    "COST_FACTOR",
    "FIRST_STEP",
    "MESSAGE_OVERHEAD",
    "SMALL_OCTETS",
    "Claim",
    "MemoryBudget",
    "cost",
    "default_budget",
    "minimum_budget",
    "next_step",
]

# Memory per octet of a message in flight: its bytes as received, the parse,
# the decoded parts, the payload's and the job's JSON, and (embedded jobs
# service) the JSON received and decoded again, measured with RSS
# (docs/guarantees.md, "Memory"): ~7x for messages in flight together. One
# batch at a time is also being inserted into SQLite, which copies its jobs
# twice more (~4x a job's size); that one-at-a-time share is not charged
# per message.
COST_FACTOR: Final = 8
# Per message: the parsed headers, the envelope, the job's small fields.
MESSAGE_OVERHEAD: Final = 16 * 1024
# A message up to this size is "small": DATA without SIZE= claims this much,
# and small claims may use the reserve. It is small enough for every one of
# max_connections (1000) sessions to be in DATA at once within the default
# budget (1000 x 272 KiB), and most plain mail fits.
SMALL_OCTETS: Final = 32 * 1024
# What a message without SIZE= claims first as it grows past SMALL_OCTETS
# (HTML mail); each next step doubles it, up to max_message_size. Coarser
# steps (this, 2 MiB, 4 MiB, then max_message_size) made a 4.5 MB message
# claim the cost of 25 MiB: under a mix of 2-5 MB mail the claims, not the
# memory, filled the budget.
FIRST_STEP: Final = 256 * 1024
# The share of the budget that waiting sessions may hold as octets read.
PARK_SHARE: Final = 4
# The share of the budget kept for small messages.
RESERVE_SHARE: Final = 8
# The default budget: this many times max_message_size, …
DEFAULT_MESSAGES: Final = 24
# … but never more than this share of the machine's memory.
DEFAULT_MEMORY_SHARE: Final = 4


def cost(octets: int) -> int:
    """The memory a message of ``octets`` may cost at its peak."""
    return COST_FACTOR * octets + MESSAGE_OVERHEAD


def next_step(octets: int, largest: int) -> int:
    """The octets to claim for a message without SIZE= that holds ``octets``.

    The smallest of :data:`FIRST_STEP`, twice that, four times… that holds
    them, but never more than ``largest``.
    """
    step = FIRST_STEP
    while step < octets:
        step *= 2
    return min(step, largest)


def minimum_budget(max_message_size: int) -> int:
    """The smallest budget that lets one message of ``max_message_size`` through.

    The largest claim (``max_message_size`` plus one read past it) must fit
    in the large pool, which is the budget less its reserve.
    """
    largest = cost(max_message_size + 64 * 1024)
    return -(-largest * RESERVE_SHARE // (RESERVE_SHARE - 1))


def default_budget(max_message_size: int, physical_memory: int | None) -> int:
    """The budget when ``smtp.memory_budget`` is 0 (the default).

    ``DEFAULT_MESSAGES × max_message_size`` bytes (600 MiB with the default
    25 MiB limit: two messages of the largest size at once, or thousands of
    small ones), at most a quarter of ``physical_memory``, and never less
    than :func:`minimum_budget`.
    """
    budget = DEFAULT_MESSAGES * max_message_size
    if physical_memory:
        budget = min(budget, physical_memory // DEFAULT_MEMORY_SHARE)
    return max(budget, minimum_budget(max_message_size))


@dataclass(eq=False, slots=True)
class Claim:
    """What one session holds of the budget."""

    held: int = 0
    large: bool = False


class MemoryBudget:
    """Claims against ``total`` bytes, with a reserve for small messages."""

    def __init__(self, total: int, *, reserve: int | None = None) -> None:
        self.total = total
        self.reserve = total // RESERVE_SHARE if reserve is None else reserve
        self.small_limit = cost(SMALL_OCTETS)
        #: Octets that waiting sessions may hold (see the module docstring).
        self.park_limit = total // PARK_SHARE
        self.used = 0
        self.large_used = 0
        self.waiting = 0
        self.parked = 0
        self._released = trio.Event()

    def try_claim(self, claim: Claim, target: int) -> bool:
        """Raise ``claim`` to ``target`` bytes if that fits now; False if not."""
        extra = target - claim.held
        if extra <= 0:
            return True
        if self.used + extra > self.total:
            return False
        if claim.large:
            if self.large_used + extra > self.total - self.reserve:
                return False
            self.large_used += extra
        elif target > self.small_limit:
            if self.large_used + target > self.total - self.reserve:
                return False
            claim.large = True
            self.large_used += target
        self.used += extra
        claim.held = target
        return True

    async def claim(self, claim: Claim, target: int, *, parking: int = 0) -> bool:
        """Raise ``claim`` to ``target`` bytes, waiting until it fits.

        A claim that does not fit now is given back while it waits (see the
        module docstring), so waiting sessions never hold each other up;
        ``parking`` is what the session holds meanwhile. False, and nothing
        changed, when parking it would pass :attr:`park_limit`.
        """
        if self.try_claim(claim, target):
            return True
        if self.parked + parking > self.park_limit:
            return False
        self.release(claim)
        self.waiting += 1
        self.parked += parking
        try:
            while not self.try_claim(claim, target):
                await self._released.wait()
        finally:
            self.waiting -= 1
            self.parked -= parking
        return True

    def release(self, claim: Claim) -> None:
        """Give back all of ``claim``."""
        self.shrink(claim, 0)

    def shrink(self, claim: Claim, target: int) -> None:
        """Lower ``claim`` to ``target`` bytes (nothing if it holds no more).

        A large claim that shrinks to a small one's size leaves the large
        pool. What is given back wakes the sessions waiting for memory.
        """
        if claim.held <= target:
            return
        self.used -= claim.held - target
        if claim.large:
            if target > self.small_limit:
                self.large_used -= claim.held - target
            else:
                self.large_used -= claim.held
                claim.large = False
        claim.held = target
        if self.waiting:
            self._released.set()
            self._released = trio.Event()

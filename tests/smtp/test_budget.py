"""The memory budget: its bookkeeping alone, then the SMTP server living within one."""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trismtp.settings import ConfigError, SmtpSettings, load_settings
from trismtp.smtp.budget import (
    FIRST_STEP,
    SMALL_OCTETS,
    Claim,
    MemoryBudget,
    cost,
    default_budget,
    minimum_budget,
    next_step,
)

from .test_server import Client, Harness, start

MIB = 1024 * 1024

# -- bookkeeping -------------------------------------------------------------------


def test_claims_grow_and_release() -> None:
    budget = MemoryBudget(1000, reserve=100)
    a, b = Claim(), Claim()
    budget.small_limit = 50

    assert budget.try_claim(a, 40)
    assert budget.try_claim(a, 30)  # already holds more: nothing to do
    assert budget.try_claim(b, 500)
    assert (a.held, b.held, budget.used, budget.large_used) == (40, 500, 540, 500)
    assert b.large
    assert not a.large

    budget.release(b)
    assert (b.held, budget.used, budget.large_used) == (0, 40, 0)


def test_large_claims_leave_the_reserve_to_small_ones() -> None:
    budget = MemoryBudget(1000, reserve=100)
    budget.small_limit = 50
    large = [Claim() for _ in range(3)]

    assert budget.try_claim(large[0], 450)
    assert budget.try_claim(large[1], 450)
    assert not budget.try_claim(large[2], 60), "the reserve is not for large claims"
    # A small claim that grows past the limit moves to the large pool whole.
    small = Claim()
    assert budget.try_claim(small, 40)
    assert not budget.try_claim(small, 60)
    assert small.held == 40
    assert not small.large
    assert budget.try_claim(Claim(), 50)
    assert budget.used == 990


def test_a_claim_shrinks_to_what_the_message_turned_out_to_cost() -> None:
    budget = MemoryBudget(1000, reserve=100)
    budget.small_limit = 50
    big, other = Claim(), Claim()
    assert budget.try_claim(big, 800)
    assert not budget.try_claim(other, 200)

    budget.shrink(big, 600)  # still large
    assert (big.held, big.large, budget.used, budget.large_used) == (600, True, 600, 600)
    budget.shrink(big, 700)  # never grows
    assert big.held == 600
    assert budget.try_claim(other, 200)
    budget.shrink(big, 30)  # small now: out of the large pool
    assert (big.held, big.large, budget.used, budget.large_used) == (30, False, 230, 200)
    budget.release(big)
    assert (budget.used, budget.large_used) == (200, 200)


def test_an_upload_without_size_claims_at_most_twice_what_it_has() -> None:
    largest = 25 * MIB + 65536
    assert next_step(SMALL_OCTETS + 1, largest) == FIRST_STEP == 256 * 1024
    assert next_step(FIRST_STEP + 1, largest) == 512 * 1024
    assert next_step(4_500_000, largest) == 8 * MIB
    assert next_step(17 * MIB, largest) == largest
    assert next_step(30 * MIB, largest) == largest
    for octets in range(FIRST_STEP, largest, 99_991):
        assert octets <= next_step(octets, largest) <= min(2 * octets, largest)


async def test_a_waiting_claim_holds_nothing_and_gets_in_once_memory_is_released() -> None:
    budget = MemoryBudget(1000, reserve=0)
    budget.small_limit = 50
    holder, waiter = Claim(), Claim()
    assert budget.try_claim(holder, 800)
    assert budget.try_claim(waiter, 40)
    got_in = trio.Event()

    async def wait() -> None:
        await budget.claim(waiter, 500)
        got_in.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        # All or nothing: waiting, it gave its 40 back (no deadlock between waiters).
        assert (waiter.held, budget.used, budget.waiting) == (0, 800, 1)
        budget.release(holder)
        await got_in.wait()
    assert (waiter.held, budget.used, budget.waiting) == (500, 500, 0)


async def test_a_claim_that_would_park_too_much_is_refused_at_once() -> None:
    budget = MemoryBudget(1000, reserve=0)
    budget.park_limit = 100
    holder, first, second = Claim(), Claim(), Claim()
    assert budget.try_claim(holder, 1000)
    assert budget.try_claim(first, 0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(budget.claim, first, 500, parking=80))
        await trio.testing.wait_all_tasks_blocked()
        assert budget.parked == 80
        # 80 + 30 octets would be held by sessions that wait: refused, not queued.
        assert not await budget.claim(second, 500, parking=30)
        assert (budget.waiting, second.held) == (1, 0)
        budget.release(holder)
    assert (budget.parked, first.held) == (0, 500)


def test_the_default_follows_max_message_size_and_the_machine() -> None:
    assert default_budget(25 * MIB, 24 * 1024 * MIB) == 600 * MIB
    assert default_budget(25 * MIB, 2048 * MIB) == 512 * MIB  # a quarter of 2 GiB
    assert default_budget(25 * MIB, 512 * MIB) == minimum_budget(25 * MIB)
    assert default_budget(25 * MIB, None) == 600 * MIB
    # The largest message always fits into the large pool.
    budget = MemoryBudget(minimum_budget(25 * MIB))
    assert budget.try_claim(Claim(), cost(25 * MIB + 65536))


def test_a_budget_too_small_for_one_message_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "settings.toml"
    config.write_text("[smtp]\nmax_message_size = 1048576\nmemory_budget = 1000000\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    message = str(caught.value)
    assert "smtp.memory_budget" in message
    assert str(minimum_budget(1048576)) in message
    assert SmtpSettings(max_message_size=1048576).memory_budget_bytes() == 24 * MIB


# -- the server within a budget ----------------------------------------------------------


async def _transaction(client: Client, *, size: int | None = None) -> list[str]:
    """EHLO and MAIL (with ``SIZE=size``): their replies."""
    mail = "MAIL FROM:<a@example.com>" + (f" SIZE={size}" if size is not None else "")
    return [
        await client.command("EHLO client.example"),
        await client.command(mail),
    ]


async def _holder_and_waiting_uploader(
    nursery: trio.Nursery, harness: Harness, *, size: int
) -> tuple[Client, Client]:
    """A session in DATA holding ``SIZE=size``, and one whose upload waits for memory."""
    holder = await harness.connect()
    await _transaction(holder, size=size)
    assert (await holder.command("RCPT TO:<b@example.com>")) == "250 2.1.5 OK"
    assert (await holder.command("DATA")).startswith("354 ")

    uploader = await harness.connect()
    await _transaction(uploader)
    assert (await uploader.command("RCPT TO:<b@example.com>")) == "250 2.1.5 OK"
    assert (await uploader.command("DATA")).startswith("354 ")
    line = b"x" * 78 + b"\r\n"
    body = b"Subject: grows\r\n\r\n" + line * (4 * SMALL_OCTETS // len(line)) + b".\r\n"
    nursery.start_soon(uploader.send, body)
    # Past its small claim, the session waits for memory and stops reading.
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert harness.smtp.budget.waiting == 1
    return holder, uploader


async def test_mail_with_a_size_that_does_not_fit_gets_452_and_small_mail_still_goes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    size = MIB
    harness = await start(
        nursery, tmp_path, max_message_size=size, memory_budget=minimum_budget(size)
    )
    big = await harness.connect()
    assert (await _transaction(big, size=size))[1] == "250 2.1.0 OK"

    other = await harness.connect()
    replies = await _transaction(other, size=size)
    assert replies[1].startswith("452 4.3.1 "), replies
    # Without SIZE, DATA claims a small message's worth: the reserve has it.
    assert (await other.command("MAIL FROM:<a@example.com>")) == "250 2.1.0 OK"
    assert (await other.command("RCPT TO:<b@example.com>")) == "250 2.1.5 OK"
    assert (await other.command("DATA")).startswith("354 ")
    await other.send(b"Subject: small\r\n\r\nhello\r\n.\r\n")
    assert (await other.reply()).startswith("250 2.0.0 OK: queued as ")

    # The big transaction ends: its claim is free for the next one.
    assert (await big.command("RSET")) == "250 2.0.0 OK"
    assert (await other.command(f"MAIL FROM:<a@example.com> SIZE={size}")) == "250 2.1.0 OK"
    assert harness.smtp.budget.used == cost(size)


async def test_an_upload_that_outgrows_the_budget_waits_then_completes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    size = MIB
    harness = await start(
        nursery, tmp_path, max_message_size=size, memory_budget=minimum_budget(size)
    )
    holder, uploader = await _holder_and_waiting_uploader(nursery, harness, size=size)
    assert harness.smtp.budget.used == cost(size)

    await holder.send(b"Subject: first\r\n\r\nhello\r\n.\r\n")
    assert (await holder.reply()).startswith("250 2.0.0 OK: queued as ")
    assert (await uploader.reply()).startswith("250 2.0.0 OK: queued as ")
    subjects = sorted(str(p["message"]["subject"]) for p in harness.stored())  # type: ignore[index]
    assert subjects == ["first", "grows"]
    assert harness.smtp.budget.used == 0


async def test_an_upload_waiting_for_memory_gets_in_at_the_final_dot_of_an_oversized_claim(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A message that declared more than it sent holds only its cost while it is pushed."""
    size = MIB
    harness = await start(
        nursery, tmp_path, max_message_size=size, memory_budget=minimum_budget(size)
    )
    # The first message's push is held until the test lets it go: its final
    # dot has come, its reply has not.
    pushed = harness.smtp._push
    first_push_held, let_go = trio.Event(), trio.Event()

    async def push(*args: Any, **kwargs: Any) -> Any:
        if not first_push_held.is_set():
            first_push_held.set()
            await let_go.wait()
        return await pushed(*args, **kwargs)

    harness.smtp._push = push
    # The holder's SIZE= claims all of the large pool.
    holder, uploader = await _holder_and_waiting_uploader(nursery, harness, size=size)

    # The holder sends 20 bytes, not the megabyte it declared.
    await holder.send(b"Subject: first\r\n\r\n.\r\n")
    await first_push_held.wait()
    assert (await uploader.reply()).startswith("250 2.0.0 OK: queued as ")
    let_go.set()
    assert (await holder.reply()).startswith("250 2.0.0 OK: queued as ")
    subjects = sorted(str(p["message"]["subject"]) for p in harness.stored())  # type: ignore[index]
    assert subjects == ["first", "grows"]


async def test_an_upload_that_waits_for_memory_past_data_timeout_gets_421_saying_why(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    size = MIB
    harness = await start(
        nursery,
        tmp_path,
        max_message_size=size,
        memory_budget=minimum_budget(size),
        data_timeout=1.0,
    )
    big = await harness.connect()  # holds the budget and never goes on
    assert (await _transaction(big, size=size))[1] == "250 2.1.0 OK"

    late = await harness.connect()
    assert (await late.command("EHLO client.example")).startswith("250")
    assert (await late.command("MAIL FROM:<a@example.com>")) == "250 2.1.0 OK"
    assert (await late.command("RCPT TO:<b@example.com>")) == "250 2.1.5 OK"
    assert (await late.command("DATA")).startswith("354 ")
    with caplog.at_level(logging.WARNING, logger="trismtp.smtp"):
        # Past the small messages' reserve: this upload must wait for memory.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await late.send(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 600)
        assert (await late.reply()).startswith("421 4.3.1 ")

    [line] = [r.getMessage() for r in caplog.records if "system storage" in r.getMessage()]
    assert "smtp.memory_budget" in line
    assert "smtp.data_timeout" in line

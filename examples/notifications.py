"""Per-user notification sender on asyncio: each user's notifications arrive in order.

Notifications for one user go out one at a time, in the order they were
produced (a "your order shipped" must not overtake "order confirmed"); users
are served concurrently, at most CONCURRENCY sends in flight. A user whose
device rejects a send does not hold up anyone else: the failure goes to
on_error and that user's next notifications still go out.

Run: python examples/notifications.py
"""

from __future__ import annotations

import asyncio
import random

from keyedexec.aio import AsyncKeyedExecutor

CONCURRENCY = 4
USERS = ["alice", "bob", "carol", "dave", "erin"]
STEPS = [
    "order confirmed",
    "payment received",
    "packed",
    "shipped",
    "out for delivery",
    "delivered",
]


class PushService:
    """A stand-in for a push provider: a network round trip per send."""

    def __init__(self) -> None:
        self.delivered: dict[str, list[str]] = {u: [] for u in USERS}
        self.in_flight = 0
        self.peak_in_flight = 0
        self.rng = random.Random(1)

    async def send(self, user: str, text: str) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.rng.uniform(0.001, 0.01))  # the round trip
            if user == "dave" and text == "packed":
                raise ConnectionError("device token expired")
            self.delivered[user].append(text)
        finally:
            self.in_flight -= 1


async def main() -> None:
    push = PushService()
    failures: list[str] = []

    def on_error(user: object, exc: BaseException) -> None:
        failures.append(f"{user}: {exc}")

    async with AsyncKeyedExecutor[str](concurrency=CONCURRENCY, on_error=on_error) as sender:
        # Events arrive interleaved across users, in order for each user.
        for step in STEPS:
            for user in USERS:
                sender.execute(user, push.send, user, step)
        # A receipt: awaited like any coroutine, after alice's earlier notifications.
        await sender.submit("alice", push.send, "alice", "thanks for your order")

    for user in USERS:
        expected = [s for s in STEPS if not (user == "dave" and s == "packed")]
        if user == "alice":
            expected.append("thanks for your order")
        status = "in order" if push.delivered[user] == expected else "OUT OF ORDER"
        print(f"{user}: {len(push.delivered[user])} notifications, {status}")
    for failure in failures:
        print(f"failed: {failure}")
    print(f"peak sends in flight: {push.peak_in_flight} (limit {CONCURRENCY})")
    m = sender.metrics()
    print(f"sent {m.completed - m.failed}, failed {m.failed}, users still tracked: {m.active_keys}")


if __name__ == "__main__":
    asyncio.run(main())

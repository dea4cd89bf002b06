"""The Go keyedexecutor README usage example, in Python, with the same observable behaviour.

``go_readme_main`` follows the Go ``main`` line by line (see
shared/seeds/keyedexecutor-README.md); ``fmt.Println`` becomes ``say``, which
records into a list. The sleeps are shortened: they only make the example's
interleaving plausible, nothing below depends on them.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import pytest

from keyedexec import Context, KeyedExecutor, Stats, background

pytestmark = pytest.mark.timeout(30)


def go_readme_main(executor_cls: type[KeyedExecutor[str]], say: Callable[..., None]) -> Stats:
    # exec := keyedexecutor.New[string](keyedexecutor.Config{WorkerCount: 4})
    with executor_cls(4) as ex:
        # ctx = context.WithValue(context.Background(), "user", "user1")
        ctx = background().with_value("user", "user1")

        def user1_first(ctx: Context) -> None:
            say("Processing task for user1")
            time.sleep(0.01)
            say("Processing task for user1, read ctx value, User:", ctx.value("user"))

        ex.execute_with_context("user1", ctx, user1_first)

        # Tasks with the same key run sequentially
        ex.execute("user1", lambda: say("Another task for user1, runs after the first one"))

        # Tasks with different keys can run in parallel
        def user2() -> None:
            say("Processing task for user2 (can run in parallel with user1 tasks)")
            raise Exception("example error")

        err = ex.execute_with_error("user2", user2).result()  # err := <-exec.ExecuteWithError(...)
        say("err returned", err)

        def user3(ctx: Context) -> None:
            say("Processing task for user3 (can run in parallel with user1 tasks)")
            time.sleep(0.02)
            say("Processing task for user3, read ctx value, User:", ctx.value("user"))
            raise Exception("example error for user3")

        err = ex.execute_with_context_error("user3", ctx, user3).result()
        say("err returned for user3", err)

        worker_count, pending_tasks = stats = ex.stats()
        say("executor stats worker count:", worker_count, "pending tasks:", pending_tasks)
    # time.Sleep(time.Second): leaving the with block waits for every task instead
    return stats


def test_go_readme_example(impl: Any) -> None:
    """The README example's output, error results and stats, on both schedulers."""
    out: list[str] = []
    lock = threading.Lock()
    errors: list[Any] = []

    def say(*parts: Any) -> None:
        # fmt.Println: operands separated by spaces; keep the error objects too
        errors.extend(p for p in parts if isinstance(p, BaseException))
        with lock:
            out.append(" ".join(str(p) for p in parts))

    stats = go_readme_main(impl.KeyedExecutor, say)

    # The ctx value is read inside the task, and the two user1 tasks run in order.
    user1 = [line for line in out if line.startswith(("Processing task for user1", "Another"))]
    assert user1 == [
        "Processing task for user1",
        "Processing task for user1, read ctx value, User: user1",
        "Another task for user1, runs after the first one",
    ]
    # The error results are the exceptions the tasks raised, returned rather than raised.
    assert [type(e) for e in errors] == [Exception, Exception]
    assert [str(e) for e in errors] == ["example error", "example error for user3"]
    others = [line for line in out if line not in user1]
    assert others == [
        "Processing task for user2 (can run in parallel with user1 tasks)",
        "err returned example error",
        "Processing task for user3 (can run in parallel with user1 tasks)",
        "Processing task for user3, read ctx value, User: user1",
        "err returned for user3 example error for user3",
        f"executor stats worker count: 4 pending tasks: {stats.pending}",
    ]
    # Stats(workers, pending): pending counts the user1 tasks that may still be in flight.
    assert isinstance(stats, Stats) and stats.workers == 4 and 0 <= stats.pending <= 2

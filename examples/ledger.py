"""A per-account ledger where order matters: KeyedExecutor keeps each account's history.

Transactions for one account must apply in the order they were received: a
withdrawal checks the balance left by the deposits before it, and an overdraft
is rejected. KeyedExecutor runs each account's transactions one at a time, in
order, while different accounts are processed in parallel, so the ledger needs
no lock per account and ends exactly where a sequential replay ends.

Run: python examples/ledger.py
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

from keyedexec import KeyedExecutor

ACCOUNTS = [f"acct-{n}" for n in range(1, 7)]


@dataclass(frozen=True)
class Txn:
    account: str
    amount: int  # positive: deposit; negative: withdrawal


@dataclass
class Account:
    balance: int = 0
    applied: int = 0
    rejected: list[int] = field(default_factory=list)


def incoming(n: int) -> list[Txn]:
    """A day's transactions, interleaved across accounts."""
    rng = random.Random(42)
    return [
        Txn(rng.choice(ACCOUNTS), rng.choice([100, 50, 20, -30, -70, -120])) for _ in range(n)
    ]


def apply(ledger: dict[str, Account], txn: Txn) -> None:
    """Apply one transaction; reject a withdrawal that would overdraw the account.

    No lock: only this account's transactions touch ledger[txn.account], and
    they run one at a time.
    """
    acct = ledger[txn.account]
    balance = acct.balance
    threading.Event().wait(0.0002)  # a database round trip between read and write
    if balance + txn.amount < 0:
        acct.rejected.append(txn.amount)
        return
    acct.balance = balance + txn.amount
    acct.applied += 1


def main() -> None:
    txns = incoming(600)

    replay = {a: Account() for a in ACCOUNTS}
    for txn in txns:
        apply(replay, txn)

    ledger = {a: Account() for a in ACCOUNTS}
    with KeyedExecutor[str](workers=6) as ex:
        for txn in txns:
            ex.execute(txn.account, apply, ledger, txn)
        # Reads queue behind each account's writes: map keyed by account.
        balances = list(ex.map(lambda a: ledger[a].balance, ACCOUNTS, key=lambda a: a))

    for name, balance in zip(ACCOUNTS, balances):
        acct = ledger[name]
        print(f"{name}: balance {balance}, {acct.applied} applied, {len(acct.rejected)} rejected")
    same = all(ledger[a] == replay[a] for a in ACCOUNTS)
    print(f"matches sequential replay: {same}")
    m = ex.metrics()
    print(f"tasks run: {m.completed} ({len(txns)} transactions, {len(ACCOUNTS)} reads)")


if __name__ == "__main__":
    main()

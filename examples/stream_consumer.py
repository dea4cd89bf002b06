"""A partitioned stream consumer with backpressure: TaskPool keyed by entity.

Records arrive from a partitioned log (think Kafka): each carries an entity id
and a per-entity sequence number. Records of one entity must be processed in
order; different entities in parallel. TaskPool gives each active entity a
bounded queue (queue_size): when a slow entity's queue is full, the consumer's
submit waits, so a hot entity cannot make the consumer buffer the whole log in
memory. After the last record the consumer waits for processing to finish,
then commits each partition's offset and stops the pool.

Run: python examples/stream_consumer.py
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from keyedexec import Context, TaskPool

PARTITIONS = 4
QUEUE_SIZE = 4
SLOW_ENTITY = "order-7"  # its handler is slow: the consumer must wait for it


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    entity: str
    seq: int


def stream(n: int) -> Iterator[Record]:
    """The log: records of 40 entities spread over the partitions (by entity)."""
    rng = random.Random(3)
    seqs: dict[str, int] = {}
    offsets = [0] * PARTITIONS
    for _ in range(n):
        entity = SLOW_ENTITY if rng.random() < 0.1 else f"order-{rng.randrange(40)}"
        seqs[entity] = seqs.get(entity, 0) + 1
        partition = int(entity.split("-")[1]) % PARTITIONS
        offsets[partition] += 1
        yield Record(partition, offsets[partition], entity, seqs[entity])


class Processor:
    """Per-entity state, touched only by that entity's jobs (so no lock for it)."""

    def __init__(self) -> None:
        self.last_seq: dict[str, int] = {}
        self.out_of_order = 0
        self.lock = threading.Condition()  # guards the counters below only
        self.outstanding = 0
        self.processed = [0] * PARTITIONS

    def handle(self, ctx: Context, rec: Record) -> None:
        if ctx.cancelled:  # the pool is stopping: leave the record unprocessed
            return
        if rec.seq != self.last_seq.get(rec.entity, 0) + 1:
            self.out_of_order += 1
        self.last_seq[rec.entity] = rec.seq
        ctx.wait(0.003 if rec.entity == SLOW_ENTITY else 0.0001)  # the work itself
        with self.lock:
            self.processed[rec.partition] += 1
            self.outstanding -= 1
            self.lock.notify_all()

    def drain(self) -> None:
        with self.lock:
            self.lock.wait_for(lambda: self.outstanding == 0)


def main() -> None:
    proc = Processor()
    paused = 0
    last_offset = [0] * PARTITIONS
    with TaskPool[str](queue_size=QUEUE_SIZE, max_workers=8) as pool:
        for rec in stream(1500):
            with proc.lock:
                proc.outstanding += 1

            def job(ctx: Context, rec: Record = rec) -> None:
                proc.handle(ctx, rec)

            if not pool.try_submit(rec.entity, job):
                paused += 1  # the entity's queue is full: wait for room (backpressure)
                pool.submit(rec.entity, job)
            last_offset[rec.partition] = rec.offset
        proc.drain()  # every record consumed so far is processed: safe to commit
    print(f"processed {sum(proc.processed)} records of {len(proc.last_seq)} entities")
    print(f"out of order: {proc.out_of_order}")
    print(f"backpressure: consumer waited for a full entity queue: {'yes' if paused else 'no'}")
    for p in range(PARTITIONS):
        print(f"partition {p}: committed offset {last_offset[p]} ({proc.processed[p]} processed)")
    print(f"jobs discarded at stop: {pool.metrics().discarded}")


if __name__ == "__main__":
    main()

"""The leader is killed (SIGKILL) during an ORM unit of work, 20 times. Each unit of work adds
an order with five items (flush), reads them back and commits; the kill lands before its first,
second or third statement or while its commit is in flight, in turn. Every commit either succeeds once or raises: a
retryable error (TransactionAborted, SerializationError, Unavailable: nothing was applied)
runs the unit of work again; OutcomeUnknown is resent with its serial (the README's recipe).
At the end every order exists exactly once with its five items, and all nodes are equal."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

sa = pytest.importorskip("sqlalchemy")

from sqlalchemy import ForeignKey, func, select  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship  # noqa: E402

import raftsql.driver as db  # noqa: E402

try:
    from raftsql.testing.cluster import LocalCluster
except ImportError:  # before the harness moved out of server/
    from raftsql.server.testing import LocalCluster

TRIALS = 20
ITEMS = 5


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "fo_order"
    id: Mapped[int] = mapped_column(primary_key=True)
    ref: Mapped[str]  # not UNIQUE: a unit of work applied twice must be visible as two rows
    items: Mapped[list[Item]] = relationship(back_populates="order")


class Item(Base):
    __tablename__ = "fo_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("fo_order.id"))
    n: Mapped[int]
    order: Mapped[Order] = relationship(back_populates="items")


@pytest.fixture(scope="module")
def fcluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("orm-failover"), 3)
    try:
        c.start()
        c.wait_leader()
        yield c
    finally:
        c.close()


def _unit_of_work(engine, ref: str) -> None:
    with Session(engine) as session:
        order = Order(ref=ref, items=[Item(n=k) for k in range(ITEMS)])
        session.add(order)
        session.flush()  # INSERTs previewed on the leader (ids assigned)
        assert session.scalar(select(func.count()).select_from(Item).where(Item.order_id == order.id)) == ITEMS
        raw = session.connection().connection.driver_connection
        try:
            session.commit()  # one log entry
        except sa.exc.OperationalError as e:
            if isinstance(e.orig, db.OutcomeUnknown):
                raw.resend(e.orig)  # same serial: applied at most once
                return
            raise


def test_leader_killed_during_orm_unit_of_work(fcluster):
    from raftsql.sqla_dialect import sqlalchemy_url

    engine = sa.create_engine(sqlalchemy_url(fcluster.dsn, timeout="10"), pool_pre_ping=True)
    Base.metadata.create_all(engine)
    outcomes: Counter[str] = Counter()
    rng = random.Random(18)
    plan: dict = {}  # the current trial's kill point

    def kill_now() -> None:
        if plan.pop("leader", None) is not None:
            fcluster.kill(plan["victim"])

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _before(conn, cursor, statement, parameters, context, executemany):
        if "leader" in plan and "fo_" in statement:
            plan["seen"] = plan.get("seen", 0) + 1
            if plan["point"] == f"before statement {plan['seen']}":
                kill_now()

    @sa.event.listens_for(engine, "commit")
    def _commit(conn):
        if "leader" in plan and plan["point"] == "during commit":
            delay = rng.uniform(0.0, 0.004)  # the commit request is on its way
            threading.Thread(target=lambda: (time.sleep(delay), kill_now())).start()

    points = ["before statement 1", "before statement 2", "before statement 3", "during commit"]
    try:
        for trial in range(TRIALS):
            leader = fcluster.wait_leader(timeout=30)
            plan.clear()
            plan.update(leader=leader, victim=leader, point=points[trial % len(points)])
            attempts = 0
            while True:
                attempts += 1
                try:
                    _unit_of_work(engine, f"trial-{trial}")
                    break
                except sa.exc.OperationalError as e:
                    assert getattr(e.orig, "retryable", False), e  # nothing applied: run again
                    outcomes[type(e.orig).__name__] += 1
                    assert attempts < 20
            outcomes["committed on the first attempt" if attempts == 1 else "committed after a retry"] += 1
            deadline = time.monotonic() + 5
            while fcluster.alive(leader) and time.monotonic() < deadline:
                time.sleep(0.01)  # the commit's killer thread
            assert not fcluster.alive(leader), f"trial {trial}: the leader was not killed"
            outcomes[f"killed {plan['point']}"] += 1
            fcluster.start(leader)  # the killed node comes back and catches up
        fcluster.wait_leader(timeout=30)
        hashes = fcluster.hashes(timeout=60)
        assert len(set(hashes.values())) == 1, hashes
        with engine.connect() as c:
            per_ref = dict(c.execute(select(Order.ref, func.count()).group_by(Order.ref)).all())
            assert per_ref == {f"trial-{t}": 1 for t in range(TRIALS)}  # none lost, none twice
            items = c.execute(select(Order.ref, func.count(Item.id)).join(Item).group_by(Order.ref)).all()
            assert dict(items) == {f"trial-{t}": ITEMS for t in range(TRIALS)}
            assert c.execute(select(func.count()).select_from(Item)).scalar() == TRIALS * ITEMS
    finally:
        engine.dispose()
    print(f"\n{TRIALS} trials, leader killed in each: {dict(outcomes)}")

"""The parker: one thread that watches every idle client connection and wakes their threads a
few at a time (server/DESIGN.md, "Connections": 1,000 threads woken at once, each needing the
GIL ten times to finish, starved the ticker and the Ready loop into an election)."""

from __future__ import annotations

import heapq
import logging
import os
import select
import threading
import time


class _Parked:
    """One thread parked in _Parker.wait: woken once, by readiness, its deadline or stop."""

    __slots__ = ("fd", "deadline", "event", "ready", "slot", "done")

    def __init__(self, fd: int, deadline: float | None):
        self.fd = fd
        self.deadline = deadline
        self.event = threading.Event()
        self.ready = False  # the socket was reported ready (else: deadline or stop)
        self.slot = False  # the waker took a slot for this thread; ClientConn gives it back
        self.done = False  # no longer registered (guarded by the parker's lock)

    def __lt__(self, other: _Parked) -> bool:  # heap order among equal deadlines
        return id(self) < id(other)


class _Parker:
    """Watches every waiting client connection from one thread (epoll) and lets at most
    `slots` of the parked threads run at once.

    Why (server/DESIGN.md, "Connections"): with one thread per connection, 1,000 idle
    connections closed at once wake 1,000 threads that all want the GIL; CPython hands the
    GIL to any of them, so the ticker and the Ready loop wait hundreds of ms for their turn
    and the followers start an election. Here a closed (or readable, or timed-out)
    connection's thread is only woken once a slot is free, so the Raft threads never queue
    behind more than `slots` connection threads. The woken thread gives its slot back when it
    has a frame, parks again, or (on EOF) when its connection is torn down.
    """

    def __init__(self, slots: int, log: logging.Logger, name: str):
        self._ep = select.epoll()
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(slots)
        self._parked: dict[int, _Parked] = {}
        self._deadlines: list[tuple[float, _Parked]] = []  # a heap, with stale entries
        self._next_wake = float("inf")  # when the parker thread's poll returns at the latest
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._ep.register(self._wake_r, select.EPOLLIN)
        self._stopped = False
        self._log = log
        self._name = name
        self._slow_slots = 0  # wakes made without a slot because none came free in time
        self._hot = 0  # threads in a hot poll (see HOT_POLL)
        self._hot_max = slots

    @property
    def stopped(self) -> bool:
        return self._stopped

    def wait(self, fd: int, events: int, deadline: float | None) -> _Parked | None:
        """Block until fd has `events` (select.POLLIN / POLLOUT; a hang-up counts), the
        deadline passes, or stop(). Returns the record (its .slot may be set: the caller
        must release it), or None if the parker cannot take it (stopped, or another thread
        already waits on this fd): the caller polls by itself then."""
        p = _Parked(fd, deadline)
        mask = select.EPOLLRDHUP | (select.EPOLLIN if events & select.POLLIN else 0)
        if events & select.POLLOUT:
            mask |= select.EPOLLOUT
        with self._lock:
            if self._stopped:
                return None
            try:
                self._ep.register(fd, mask)
            except (OSError, ValueError):  # closed, or another thread waits on it: poll
                return None
            self._parked[fd] = p
            poke = False
            if deadline is not None:
                heapq.heappush(self._deadlines, (deadline, p))
                if deadline < self._next_wake:
                    self._next_wake = deadline
                    poke = True
        if poke:
            self._poke()
        # The parker wakes us; the timeout is only a backstop should it ever fail to.
        backstop = None if deadline is None else max(0.0, deadline - time.monotonic()) + 1.0
        if not p.event.wait(backstop):
            with self._lock:
                self._forget(p)
        return p

    def release(self) -> None:
        self._slots.release()

    def begin_hot(self) -> bool:
        """May the caller poll by itself for HOT_POLL? (then end_hot() afterwards)"""
        with self._lock:
            if self._hot >= self._hot_max or self._stopped:
                return False
            self._hot += 1
            return True

    def end_hot(self) -> None:
        with self._lock:
            self._hot -= 1

    def _forget(self, p: _Parked) -> None:
        """Unregister p (with the lock held); idempotent."""
        if p.done:
            return
        p.done = True
        if self._parked.get(p.fd) is p:
            del self._parked[p.fd]
            try:
                self._ep.unregister(p.fd)
            except (OSError, ValueError):
                pass

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the parker is woken anyway

    def run(self) -> None:
        """The parker thread (until stop())."""
        while True:
            with self._lock:
                if self._stopped:
                    break
                nxt = self._next_wake
            timeout = -1.0 if nxt == float("inf") else max(0.0, nxt - time.monotonic())
            try:
                events = self._ep.poll(timeout)
            except InterruptedError:
                continue
            except (OSError, ValueError):
                break  # closed by stop()
            now = time.monotonic()
            woken: list[_Parked] = []
            with self._lock:
                if self._stopped:
                    break
                for fd, _ in events:
                    if fd == self._wake_r:
                        try:
                            while os.read(self._wake_r, 4096):
                                pass
                        except (BlockingIOError, OSError):
                            pass
                        continue
                    p = self._parked.get(fd)
                    if p is not None:
                        p.ready = True
                        self._forget(p)
                        woken.append(p)
                heap = self._deadlines
                while heap and heap[0][0] <= now:
                    _, p = heapq.heappop(heap)
                    if not p.done:
                        self._forget(p)
                        woken.append(p)
                if len(heap) > 64 and len(heap) > 2 * len(self._parked):
                    self._deadlines = heap = [e for e in heap if not e[1].done]
                    heapq.heapify(heap)
                self._next_wake = heap[0][0] if heap else float("inf")
            for p in woken:
                p.slot = self._take_slot()
                p.event.set()
        self._wake_all()

    def _take_slot(self) -> bool:
        """The admission gate. A slot not freed within a second (a handler stuck in its
        teardown) must not stop every other connection: then wake without one."""
        give_up = time.monotonic() + 1.0
        while not self._stopped:
            if self._slots.acquire(timeout=0.1):
                return True
            if time.monotonic() > give_up:
                self._slow_slots += 1
                if self._slow_slots == 1:
                    self._log.warning(
                        "%s: client connection threads are slow to give back their slots",
                        self._name,
                    )
                return False
        return False

    def stop(self) -> None:
        """Wake every parked thread (without slots); later waits return None at once."""
        with self._lock:
            self._stopped = True
        self._poke()
        self._wake_all()

    def _wake_all(self) -> None:
        with self._lock:
            parked = list(self._parked.values())
            for p in parked:
                self._forget(p)
        for p in parked:
            p.event.set()

    def close(self) -> None:
        """After the parker thread has exited."""
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._ep.close()

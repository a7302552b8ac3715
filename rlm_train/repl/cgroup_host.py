"""The host's side of a session's cgroups (cgroups.py makes them): freezing between cells
and while a cell waits on a sub-call, and the session's CPU time. Outside the sandbox, so
plain paths (cgroups.host_paths).

What this costs per cell is what it adds to the host -> worker round trip (`bench runtime`
prices it): two locks and a set insertion to schedule the freeze, a lock to cancel it, and
only rarely a read of the CPU time (see `SessionControl.over_budget`).
"""

from __future__ import annotations

import os
import signal
import threading
import time

# A session is frozen this long after its cell ended, unless the next cell came first.
# Freezing at once costs every round trip two extra wake-ups of the worker (`bench runtime`,
# section c; docs/measurements.md); between the turns of an RLM episode (seconds of model
# time) the delay changes nothing, and what runs in it is bounded by the CPU quota.
FREEZE_DELAY_S = 0.05


class _DelayedFreezer:
    """One thread that freezes sessions whose freeze fell due, checking every half delay.
    After half a second with no session watched it parks on a lock (no wake-ups) instead
    of exiting: starting a thread again cost the host more per session than parking when sessions
    came one after another, and parking at once made a session whose cells run back to
    back wake it every 25 ms.
    Its lock guards only the set of watched sessions, never a write to a cgroup file: each
    freeze is ordered against that session's next thaw by the session's own lock. When one
    lock was held across a whole pass of freezes, a pass over a wave of 64 sessions (each
    write lets go of the GIL, and getting it back waits on the event loop) held up the thaw
    of every cell about to run.
    It sleeps rather than waiting on a condition: a thread parked in
    Condition.wait(timeout) made every round trip slower here (not explained). The numbers:
    docs/measurements.md."""

    IDLE_PASSES = 20  # x FREEZE_DELAY_S / 2: how long it stays up with nothing to watch

    def __init__(self):
        self.lock = threading.Lock()
        self.watched: set[SessionControl] = set()
        self.polled: set[SessionControl] = set()  # waiting on a sub-call, CPU time read each pass
        self.thread: threading.Thread | None = None
        self.parked = False
        self.wake = threading.Lock()  # held while parked; schedule() releases it
        self.wake.acquire()

    def schedule(self, control: SessionControl) -> None:
        with control.lock:
            control.freeze_at = time.monotonic() + FREEZE_DELAY_S
        self._watch(self.watched, control)

    def poll(self, control: SessionControl) -> None:
        self._watch(self.polled, control)

    def _watch(self, which: set[SessionControl], control: SessionControl) -> None:
        with self.lock:
            which.add(control)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="rlm-freezer", daemon=True)
                self.thread.start()
            elif self.parked:
                self.parked = False
                self.wake.release()

    def _run(self) -> None:
        idle = 0
        while True:
            time.sleep(FREEZE_DELAY_S / 2)
            now = time.monotonic()
            with self.lock:
                # freeze_at is read without the session's lock: freeze_if_due checks it again.
                due = [c for c in self.watched if c.freeze_at is None or c.freeze_at <= now]
                self.watched.difference_update(due)
                polled = list(self.polled)
                idle = 0 if self.watched or due or polled else idle + 1
                park = self.parked = idle >= self.IDLE_PASSES
            for control in due:
                control.freeze_if_due(now)
            done = [control for control in polled if not control.poll_cpu()]
            if done:
                with self.lock:
                    self.polled.difference_update(done)
            if park:
                self.wake.acquire()  # until schedule() has a session for us again
                idle = 0


_freezer = _DelayedFreezer()


def _fresh_freezer_after_fork() -> None:
    """A forked host (a DataLoader worker) has no freezer thread: its sessions get their own."""
    global _freezer
    _freezer = _DelayedFreezer()


os.register_at_fork(after_in_child=_fresh_freezer_after_fork)

# CFS bandwidth lets a group overrun its quota by a slice or a tick per CPU before it is
# throttled, and pays it back next period; these margins cover that with room to spare.
_QUOTA_MARGIN = 1.1
_QUOTA_SLACK_S = 0.25 + 0.02 * (os.cpu_count() or 1)


class SessionControl:
    """The host's handle on one session's groups: freeze between cells, CPU time used.
    Files stay open for the session (a pwrite/pread, no path lookups).

    `cpu_cap`: the session's CPU quota in cores when its cpu group enforces one, else None.
    With a quota, the CPU time a session can have used since the last read is at most
    cap x wall time (plus the margins above), so `over_budget` reads the counter only when
    that bound reaches the budget: the check stays exact, and most cells skip the read."""

    def __init__(self, paths: dict, owner: int, uid: int, cpu_cap: float | None = None):
        self.freeze_fd = -1
        self.cpu_fd = -1
        self.cpu_v2 = True
        self.frozen = False
        self.freeze_at: float | None = None  # when the delayed freezer freezes it
        self.lock = threading.Lock()  # orders a freeze against the next thaw, a poll's kill against release
        self.cpu_cap = cpu_cap
        # While a cell waits on a sub-call with its CPU time polled: the budget, the worker's
        # pidfd (the poll kills it at the budget), and the seconds it was killed at.
        self.wait_budget: float | None = None
        self.wait_pidfd = -1
        self.killed_at: float | None = None
        name = f"{owner}.{uid}"
        try:
            if "freeze" in paths:
                self.freeze_fd = os.open(os.path.join(paths["freeze"], name, "cgroup.freeze"), os.O_WRONLY | os.O_CLOEXEC)
            if "cpu_time" in paths:
                self.cpu_v2 = paths.get("cpu_time_kind") == "v2"
                leaf = "cpu.stat" if self.cpu_v2 else "cpuacct.usage"
                self.cpu_fd = os.open(os.path.join(paths["cpu_time"], name, leaf), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass  # the host is not root: the sandbox works without these, the report says so
        self.cpu_start = self.cpu_seconds()
        self.read_at, self.read_used = time.monotonic(), 0.0

    def freeze_soon(self) -> None:
        if self.freeze_fd >= 0:
            _freezer.schedule(self)

    def freeze_if_due(self, now: float) -> None:
        """The freezer's pass: freeze, unless a thaw (the next cell) came first."""
        with self.lock:
            if self.freeze_at is None or self.freeze_at > now:
                return
            self.freeze_at = None
            if self.freeze_fd >= 0 and not self.frozen:
                os.pwrite(self.freeze_fd, b"1", 0)
                self.frozen = True

    def thaw(self) -> None:
        if self.freeze_fd < 0:
            return
        with self.lock:
            self.freeze_at = None
            if self.frozen:
                os.pwrite(self.freeze_fd, b"0", 0)
                self.frozen = False

    def thaw_at_once(self) -> bool:
        """thaw() where it costs no wait (an event loop calls this): True when nothing is
        frozen (a pending freeze is called off), False when the caller must still thaw(),
        off the loop: the session is frozen, or the freezer thread is writing to it now."""
        if self.freeze_fd < 0:
            return True
        if not self.lock.acquire(blocking=False):
            return False
        try:
            self.freeze_at = None
            return not self.frozen
        finally:
            self.lock.release()

    def hold(self, budget_s: float, pidfd: int, background: bool) -> None:
        """The cell waits on a sub-call: nothing of the session may run meanwhile, so it is
        frozen at once. Where background work is allowed (or nothing can freeze it) its CPU
        time is read every freezer pass instead, and the worker killed past `budget_s`.
        `release` ends the hold; the next send to the worker thaws it."""
        if self.freeze_fd >= 0 and not background:
            with self.lock:
                self.freeze_at = None
                if not self.frozen:
                    os.pwrite(self.freeze_fd, b"1", 0)
                    self.frozen = True
        elif self.cpu_fd >= 0:
            with self.lock:
                self.wait_budget, self.wait_pidfd, self.killed_at = budget_s, pidfd, None
            _freezer.poll(self)

    def release(self) -> float | None:
        """The wait is over: the CPU seconds the poll killed the worker at, or None."""
        with self.lock:
            self.wait_budget, self.wait_pidfd = None, -1
            killed, self.killed_at = self.killed_at, None
        return killed

    def poll_cpu(self) -> bool:
        """The freezer's pass over a session whose cell waits: kill the worker once the
        session is over its budget. False when there is nothing left to poll."""
        with self.lock:  # release() cannot run meanwhile: the pidfd is still the worker's
            if self.wait_budget is None:
                return False
            used = self.over_budget(self.wait_budget)
            if used is None:
                return True
            try:
                signal.pidfd_send_signal(self.wait_pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait_budget, self.killed_at = None, used
            return False

    def cpu_seconds(self) -> float:
        """CPU seconds the session's groups were charged so far (0 where unknown)."""
        if self.cpu_fd < 0:
            return 0.0
        try:
            data = os.pread(self.cpu_fd, 4096, 0)
        except OSError:
            return 0.0
        if not self.cpu_v2:
            return int(data) / 1e9
        start = data.find(b"usage_usec ")  # the first line of cpu.stat
        if start < 0:
            return 0.0
        end = data.find(b"\n", start)
        return int(data[start + 11:end if end >= 0 else len(data)]) / 1e6

    def cpu_used(self) -> float:
        """CPU seconds this session used (read now)."""
        used = self.cpu_seconds() - self.cpu_start
        self.read_at, self.read_used = time.monotonic(), used
        return used

    def over_budget(self, budget_s: float) -> float | None:
        """The session's CPU seconds when they exceed `budget_s`, else None."""
        if self.cpu_fd < 0:
            return None
        if self.cpu_cap is not None:
            bound = self.read_used + self.cpu_cap * ((time.monotonic() - self.read_at) * _QUOTA_MARGIN) + _QUOTA_SLACK_S
            if bound < budget_s:
                return None
        used = self.cpu_used()
        return used if used > budget_s else None

    def close(self) -> None:
        if self.freeze_fd >= 0:
            self.thaw()
            with self.lock:  # a freezer pass never writes to a closed (or reused) fd
                os.close(self.freeze_fd)
                self.freeze_fd = -1
        if self.cpu_fd >= 0:
            os.close(self.cpu_fd)
            self.cpu_fd = -1

"""Proxies in one process: a single command is one proxy, a `pf-proxy run` file several.

Each proxy is a `Spec` (its kind, one of the eleven commands, and that command's options);
its kind turns it into a `Plan` (`kinds`), which says what it listens on and how it serves.
This module does what is process-wide, once for all of them:

- every listener is bound before any proxy starts, so a port in use (or two proxies on one
  address) is exit 1 naming the proxy, with nothing half-started;
- each proxy is started in a context of its own (`current`): its log lines start with its
  name, its metrics carry a `proxy` label (in a file; a single command has neither);
- READY=1 once every proxy listens; SIGTERM or SIGINT drains them all, each by its own
  drain timeout; a proxy that stops by itself stops the process, with its exit code;
- SIGHUP (files only) reloads: see `Reloader`;
- with workers (`--workers N`, or `workers` in a file), the parent binds and forks
  (:mod:`workers`); worker K serves every proxy with at least K workers, worker 1 the rest.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import signal
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pf_proxy import metrics, runtime
from pf_proxy.current import enter_proxy, owner
from pf_proxy.endpoints import BindError, IpAddress
from pf_proxy.runtime import Ready, Stop

log = logging.getLogger("pf_proxy")


@dataclass(frozen=True)
class Spec:
    """One proxy: its name (in a file; "" for a single command), its kind (a command's name)
    and that command's options, converted and with their defaults, by parameter name."""

    name: str
    kind: str
    options: dict[str, Any] = field(hash=False)

    @property
    def workers(self) -> int:
        workers: int = self.options.get("workers", 1)
        return workers

    def __str__(self) -> str:
        return f"proxy {self.name!r} ({self.kind})" if self.name else self.kind


class Plan(Protocol):
    """A proxy ready to run: built from a spec, no socket opened yet."""

    def bind(self, count: int) -> list[socket.socket]:
        """Its listening sockets for `count` processes (`BindError` names the address), or
        [] when it opens its listener itself, with backoff (the raw proxies)."""
        ...

    async def serve(self, sock: socket.socket | None, stop: Stop, ready: Ready) -> int:
        """Serve on `sock` (from `bind`) until `stop`, then drain; the exit code."""
        ...


class PlanError(Exception):
    """A proxy cannot be set up (a file it needs, an interface it looks for): exit 1."""


BuildPlan = Callable[[Spec], Plan]


@dataclass
class _Prepared:
    spec: Spec
    plan: Plan
    sockets: list[socket.socket]  # one per worker that serves it (or none)
    context: contextvars.Context  # the proxy's own (see `_own_context`)


def _own_context(spec: Spec) -> contextvars.Context:
    """A context for one start of the proxy `spec`: its plan is built and it serves in it, so
    its log lines carry its name and what it registers (metric sources) its label, and all it
    registered is taken out when it stops."""
    context = contextvars.copy_context()
    context.run(enter_proxy, spec.name)
    return context


def _prepare(specs: Iterable[Spec], build: BuildPlan) -> list[_Prepared]:
    """Plans for `specs`, their listeners bound (a socket for each of a proxy's workers);
    PlanError, naming the proxy, after closing whatever was bound."""
    prepared: list[_Prepared] = []
    try:
        for spec in specs:
            context = _own_context(spec)
            try:
                plan = context.run(build, spec)
                sockets = plan.bind(spec.workers)
            except (PlanError, BindError) as exc:
                where = f"{spec}: " if spec.name else ""
                what = exc.strerror if isinstance(exc, BindError) and exc.strerror else exc
                raise PlanError(f"{where}{what}") from exc
            prepared.append(_Prepared(spec, plan, sockets, context))
    except BaseException:
        for item in prepared:
            for sock in set(item.sockets):
                sock.close()
        raise
    return prepared


def run(
    specs: list[Spec],
    build: BuildPlan,
    metrics_address: IpAddress | None,
    reload: Callable[[], list[Spec] | None] | None = None,
) -> int:
    """Serve `specs` in this process (and its workers) until SIGTERM/SIGINT; the exit code.

    `reload`, for a file, reads it again: the new specs, or None (it said why) to keep the
    running ones.
    """
    loop = runtime.chosen_loop()
    if loop is None:  # before anything is bound or forked
        return 2
    count = max((spec.workers for spec in specs), default=1)
    try:
        prepared = _prepare(specs, build)
    except PlanError as exc:
        log.error("%s", exc)
        return 1
    if count == 1:
        proxies = Proxies(build, reload)
        return runtime.run(proxies.serve(prepared), loop, metrics_address)
    return _run_in_workers(prepared, loop, metrics_address, count)


def _run_in_workers(
    prepared: list[_Prepared], loop: str, metrics_address: IpAddress | None, count: int
) -> int:
    """Worker K (1..count) serves each proxy with K workers or more on its own socket (worker
    1 also every proxy without workers), with /metrics on the address's port plus K-1."""
    from pf_proxy import workers

    bound = [sock for item in prepared for sock in item.sockets]
    metrics_at: list[tuple[IpAddress | None, socket.socket | None]] = [(None, None)] * count
    try:
        if metrics_address is not None:
            for index in range(count):
                address = worker_metrics_address(metrics_address, index)
                metrics_socket = metrics.bind(address)
                bound.append(metrics_socket)
                metrics_at[index] = (address, metrics_socket)
    except (BindError, ValueError) as exc:
        log.error("%s", exc)
        for sock in bound:
            sock.close()
        return 1
    for item in prepared:
        log.info("Serving %s with %d worker processes", item.spec, item.spec.workers)

    def work(number: int) -> int:
        index = number - 1
        mine = [
            dataclasses.replace(item, sockets=item.sockets[index : index + 1])
            for item in prepared
            if item.spec.workers > index or (index == 0 and item.spec.workers == 1)
        ]
        address, metrics_socket = metrics_at[index]
        keep = {sock for item in mine for sock in item.sockets} | {metrics_socket}
        for sock in bound:  # the other workers' sockets are theirs
            if sock not in keep:
                sock.close()
        proxies = Proxies(build=None, reload=None)
        return runtime.run(proxies.serve(mine), loop, address, metrics_socket)

    def stop_listening() -> None:
        for sock in bound:
            sock.close()

    signal.signal(signal.SIGHUP, _reload_needs_one_process)
    return workers.Supervisor(count, work, stop_listening).run()


def _reload_needs_one_process(signum: int, frame: object) -> None:
    log.warning("SIGHUP: a reload needs workers = 1; restart the process to apply changes")


def worker_metrics_address(first: IpAddress, index: int) -> IpAddress:
    """Worker `index` (from 0) serves /metrics on the port `index` above `first`'s."""
    port = first.port + index
    if port > 0xFFFF:
        raise ValueError(f"--metrics {first}: worker {index + 1} would need port {port}")
    return dataclasses.replace(first, port=port)


@dataclass
class _Running:
    spec: Spec
    plan: Plan
    stop: Stop
    task: asyncio.Task[int]
    sock: socket.socket | None
    unregister: Callable[[], None]


class Proxies:
    """The proxies this process serves, on its event loop."""

    def __init__(
        self, build: BuildPlan | None, reload: Callable[[], list[Spec] | None] | None
    ) -> None:
        self.build = build
        self.reload = reload
        self.running: dict[str, _Running] = {}  # by name, the proxies the file has now
        self.retired: list[_Running] = []  # stopped by a reload, still draining
        self.waiting_ready = 0
        self.changed = asyncio.Event()  # a task ended, or a reload came: look again

    async def serve(self, prepared: list[_Prepared]) -> int:
        loop = asyncio.get_running_loop()
        process_stop = runtime.stop_event()
        reload_requested = False
        if self.reload is not None:

            def request_reload() -> None:
                nonlocal reload_requested
                reload_requested = True
                self.changed.set()

            loop.add_signal_handler(signal.SIGHUP, request_reload)
        stopping = loop.create_task(process_stop.wait())
        stopping.add_done_callback(lambda _: self.changed.set())
        self.waiting_ready = len(prepared)
        for item in prepared:
            self._start(
                item.spec, item.plan, item.sockets[0] if item.sockets else None, item.context
            )
        code = 0
        while not process_stop.is_set():
            await self.changed.wait()
            self.changed.clear()
            ended = [r for r in self.running.values() if r.task.done()]
            if ended:
                code = self._ended_by_itself(ended)
                break
            if reload_requested:
                reload_requested = False
                self._apply_reload()
            self._forget_finished()
        stopping.cancel()
        return max(code, await self._stop_all())

    def _start(
        self,
        spec: Spec,
        plan: Plan,
        sock: socket.socket | None,
        context: contextvars.Context,
    ) -> _Running:
        """Serve `spec` in its own context (`_own_context`, where its plan was built)."""
        stop = Stop()
        context.run(metrics.describe_command, spec.kind)
        start = context.run(owner)
        unregister = functools.partial(metrics.forget, start)
        task = asyncio.get_running_loop().create_task(
            plan.serve(sock, stop, self._ready_once()), context=context
        )
        task.add_done_callback(lambda _: self.changed.set())
        running = _Running(spec, plan, stop, task, sock, unregister)
        self.running[spec.name] = running
        return running

    def _ready_once(self) -> Ready:
        said = False

        def ready() -> None:
            nonlocal said
            if said:
                return
            said = True
            self.waiting_ready -= 1
            if self.waiting_ready == 0:
                runtime.ready()

        return ready

    def _ended_by_itself(self, ended: list[_Running]) -> int:
        code = 0
        for running in ended:
            result = _result(running.task)
            if running.spec.name:
                log.error("%s stopped by itself (exit code %d): stopping all", running.spec, result)
            code = max(code, result or 1)
        return code

    async def _stop_all(self) -> int:
        """Drain every proxy, the ones a reload stopped too; the worst exit code."""
        for running in self.running.values():
            running.stop.set(process_stopping=True)
        code = 0
        for running in [*self.running.values(), *self.retired]:
            await asyncio.wait([running.task])
            code = max(code, _result(running.task))
            running.unregister()
        return code

    def retire(self, running: _Running) -> None:
        """`running` stops taking new work and drains (a reload removed or changed it)."""
        if self.running.get(running.spec.name) is running:
            del self.running[running.spec.name]
        self.retired.append(running)
        running.stop.set(process_stopping=False)

    def _forget_finished(self) -> None:
        """Retired proxies whose drain is over: their metric sources are taken out."""
        for running in [r for r in self.retired if r.task.done()]:
            _result(running.task)
            running.unregister()
            self.retired.remove(running)

    def _apply_reload(self) -> None:
        assert self.reload is not None and self.build is not None
        log.info("SIGHUP: reloading")
        runtime.systemd_notify("RELOADING=1")
        try:
            specs = self.reload()
            if specs is None:
                return  # the file was not valid: it said why; nothing changes
            Reloader(self, self.build).apply(specs)
        finally:
            runtime.systemd_notify("READY=1")


def _result(task: asyncio.Task[int]) -> int:
    if task.cancelled():
        return 1
    exc = task.exception()
    if exc is not None:
        log.error("A proxy failed: %r", exc, exc_info=exc)
        return 1
    return task.result()


@dataclass(frozen=True)
class Changes:
    """What a reload does, by proxy name (`diff`)."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]


def diff(old: dict[str, Spec], new: dict[str, Spec]) -> Changes:
    """Old specs against new ones, by name (pure): a proxy whose kind or any option differs
    is changed."""
    return Changes(
        added=[name for name in new if name not in old],
        removed=[name for name in old if name not in new],
        changed=[name for name in new if name in old and new[name] != old[name]],
        unchanged=[name for name in new if name in old and new[name] == old[name]],
    )


class Reloader:
    """Applies new specs to the running proxies: the added start, the removed stop accepting
    and drain, the changed are restarted the same way, the unchanged are left alone (their
    listening sockets and every live connection).

    A changed proxy that keeps its listener's address hands its listening socket to its
    successor (a duplicate, taken before the old one closes its own): connections waiting in
    the backlog and new ones are never refused. Other listeners are bound before any running
    proxy is touched; one that cannot be bound is logged, and its proxy (or the old one it
    would replace) keeps its present state.
    """

    def __init__(self, proxies: Proxies, build: BuildPlan) -> None:
        self.proxies = proxies
        self.build = build

    def apply(self, specs: list[Spec]) -> None:
        running = self.proxies.running
        old = {name: r.spec for name, r in running.items()}
        new = {spec.name: spec for spec in specs}
        changes = diff(old, new)
        log.info(
            "Reload: %d added, %d removed, %d changed, %d unchanged",
            len(changes.added),
            len(changes.removed),
            len(changes.changed),
            len(changes.unchanged),
        )
        for name in changes.removed:
            self._stop(running[name], "removed")
        for name in changes.changed + changes.added:
            self._replace(running.get(name) if name in changes.changed else None, new[name])

    def _stop(self, old: _Running, why: str) -> None:
        log.info("Reload: %s %s: draining it", old.spec, why)
        self.proxies.retire(old)

    def _replace(self, old: _Running | None, spec: Spec) -> None:
        context = _own_context(spec)
        try:
            plan = context.run(self.build, spec)
        except PlanError as exc:
            metrics.forget(context.run(owner))
            self._not_applied(old, spec, exc)
            return
        if old is None:
            self._bind_and_start(spec, plan, context)
        elif old.sock is not None and _can_hand_over(old.spec, spec):
            sock = old.sock.dup()  # before the old one closes its own
            self._stop(old, "changed")
            self._start(spec, plan, sock, context, "on the listener it had")
        else:
            # A datagram socket cannot be shared (each datagram would go to either), and a
            # raw proxy's queue or listener is opened by the proxy itself: the old one
            # drains and lets go first.
            self._stop(old, "changed")
            old.task.add_done_callback(lambda _: self._bind_and_start(spec, plan, context))

    def _bind_and_start(self, spec: Spec, plan: Plan, context: contextvars.Context) -> None:
        try:
            sockets = plan.bind(1)
        except BindError as exc:
            metrics.forget(context.run(owner))
            self._not_applied(None, spec, exc)
            return
        self._start(spec, plan, sockets[0] if sockets else None, context, "")

    def _start(
        self,
        spec: Spec,
        plan: Plan,
        sock: socket.socket | None,
        context: contextvars.Context,
        how: str,
    ) -> None:
        self.proxies.waiting_ready += 1
        self.proxies._start(spec, plan, sock, context)
        log.info("Reload: %s started%s", spec, f" {how}" if how else "")

    def _not_applied(self, old: _Running | None, spec: Spec, exc: Exception) -> None:
        kept = "keeps running as it was" if old is not None else "not started"
        log.error("Reload: %s: %s; it %s", spec, exc, kept)


def _can_hand_over(old: Spec, new: Spec) -> bool:
    """Whether `new` can take over `old`'s listening socket: both TCP proxies listening at
    the same address the same way."""
    from pf_proxy import kinds

    return kinds.hands_over(old, new)

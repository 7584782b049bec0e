"""Which proxy the running code serves: a context variable the runner sets once per proxy.

`pf-proxy run` serves several proxies on one event loop. Each proxy starts in a context of its
own, and everything it schedules (readers, timers, tasks) runs in that context, so its log
lines carry its name and its metrics a `proxy` label without passing the name down every call.
A single command sets nothing: no prefix, no label, as the originals.
"""

from __future__ import annotations

from contextvars import ContextVar

_NAME: ContextVar[str | None] = ContextVar("pf_proxy_name", default=None)
_PREFIX: ContextVar[str] = ContextVar("pf_proxy_prefix", default="")
_OWNER: ContextVar[object | None] = ContextVar("pf_proxy_owner", default=None)


def proxy_name() -> str | None:
    """The name of the proxy being served here; None in a single command."""
    return _NAME.get()


def log_prefix() -> str:
    """What this proxy's log lines start with ("[name] "), or ""."""
    return _PREFIX.get()


def owner() -> object | None:
    """What stands for this start of the proxy served here (see `enter_proxy`)."""
    return _OWNER.get()


def enter_proxy(name: str) -> object:
    """Mark the current context (a fresh one) as serving the proxy `name` ("" for a single
    command: no name in lines or labels); returns a token that stands for this start of it,
    which what it registers (metric sources) is filed under."""
    if name:
        _NAME.set(name)
        _PREFIX.set(f"[{name}] ")
    token = object()
    _OWNER.set(token)
    return token

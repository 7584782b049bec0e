"""The event loops a process can serve on, imported for the least resident memory.

No proxy speaks TLS itself, yet both loops load `ssl` (libssl and libcrypto: 4.3 MiB
resident, about a fifth of an idle proxy) when they are imported: asyncio unless `ssl` is
absent, uvloop unconditionally. So `pf_proxy` imports asyncio as a Python built without `ssl`
would (its TLS support off), and uvloop with a stand-in for `ssl` holding the names uvloop
reads of it at import (`uvloop/includes/stdlib.pxi`). Afterwards `ssl` is importable as ever,
for whoever needs it (prometheus_client at the first scrape, dnspython): it is loaded when it
is used, not before.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import NoReturn

# Which event loop serves: "uvloop" (the default: the least CPU per connection) or "asyncio"
# (the standard library's loop: about 2 MiB less per process; see docs/operations/memory.md).
LOOP_ENV = "PF_PROXY_LOOP"
LOOPS = ("uvloop", "asyncio")


def import_asyncio_without_ssl() -> None:
    """Import asyncio as if `ssl` were absent, then make `ssl` importable again."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return  # too late: an importer of pf_proxy loaded them already
    sys.modules["ssl"] = None  # type: ignore[assignment]  # "import ssl" raises ImportError
    try:
        import asyncio  # noqa: F401
    finally:
        sys.modules.pop("ssl", None)  # cannot raise, whatever the import did


def ssl_stand_in() -> ModuleType:
    """A module named `ssl` with what uvloop reads of it at import: two classes, a function,
    five exceptions and three error codes (the values are `ssl`'s). Nothing here can make a
    TLS connection, and nothing asks it to: no loop is given an SSL context."""
    module = ModuleType("ssl", "pf-proxy's stand-in for ssl, while uvloop is imported")
    names: dict[str, object] = {name: type(name, (), {}) for name in ("SSLContext", "MemoryBIO")}
    for name in ("SSLError", "SSLWantReadError", "SSLSyscallError", "SSLZeroReturnError"):
        names[name] = type(name, (OSError,), {})
    names["CertificateError"] = type("CertificateError", (ValueError,), {})
    names["create_default_context"] = _no_tls
    names.update(SSL_ERROR_WANT_READ=2, SSL_ERROR_WANT_WRITE=3, SSL_ERROR_SYSCALL=5)
    vars(module).update(names)
    return module


def _no_tls(*args: object, **kwargs: object) -> NoReturn:
    raise RuntimeError("pf-proxy imported uvloop without ssl: it has no TLS")


def import_uvloop(stand_in: ModuleType | None = None) -> ModuleType | None:
    """uvloop, imported with `stand_in` (by default `ssl_stand_in()`) in place of an `ssl`
    not loaded yet; None where uvloop is not installed. A uvloop that wants more of `ssl` than
    the stand-in has is imported again with the real one: it then costs the 4.3 MiB, and works."""
    if "uvloop" in sys.modules or "ssl" in sys.modules:
        return _plain_uvloop()
    sys.modules["ssl"] = ssl_stand_in() if stand_in is None else stand_in
    try:
        import uvloop

        return uvloop
    except Exception:
        for name in [name for name in sys.modules if name.partition(".")[0] == "uvloop"]:
            del sys.modules[name]
    finally:
        sys.modules.pop("ssl", None)  # cannot raise, whatever the import did
    return _plain_uvloop()


def _plain_uvloop() -> ModuleType | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop

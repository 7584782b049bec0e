"""``recvmmsg`` and ``sendmmsg`` from libc, through ctypes: many datagrams per system call.

The raw proxies move one packet per datagram: one netlink message per queued packet, one raw
send per packet written out. Python's socket module offers ``recvmsg``/``sendmsg``, one
datagram a call, so a burst of 64 packets costs 64 system calls (and 64 trips through the
socket module's argument parsing) each way. Linux has had ``recvmmsg(2)`` (2.6.33) and
``sendmmsg(2)`` (3.0) to do a whole burst in one call; CPython does not wrap them, so this
module does, with ctypes, and nothing else:

- :class:`ReceiveBatch` receives up to ``slots`` datagrams with one ``recvmmsg``, each into
  its own fixed-size slot of one buffer allocated once (an anonymous mapping: a page is
  resident only once a datagram was written into it, so slots sized for the largest datagram
  cost address space, not memory, while datagrams stay small);
- :class:`SendBatch` sends up to ``slots`` datagrams with one ``sendmmsg``, each to the
  address its caller wrote into the datagram's name slot. The data is not copied: the kernel
  reads it where it lies.

Both lay out ``struct mmsghdr``/``struct msghdr``/``struct iovec`` as ``<sys/socket.h>`` and
``<bits/types/struct_iovec.h>`` declare them, with ctypes types, so pointer and ``size_t``
widths follow the platform (x86-64 and aarch64 alike). Errors are raised as the socket module
raises them: ``OSError(errno, strerror)``, which Python turns into ``BlockingIOError`` for
EAGAIN, ``InterruptedError`` for EINTR and so on. Both calls are made with ``MSG_DONTWAIT`` by
default, for sockets on an event loop.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["MSG_DONTWAIT", "MSG_TRUNC", "Datagram", "ReceiveBatch", "SendBatch"]

MSG_TRUNC = 0x20  # bits/socket.h: in msg_flags, the datagram was longer than the buffer;
# in the flags of a receive on datagram and netlink sockets, return the datagram's real length
MSG_DONTWAIT = 0x40  # bits/socket.h: do not block (EAGAIN instead)
UIO_MAXIOV = 1024  # linux/uio.h: the most messages one sendmmsg takes (and iovecs one msghdr)

Datagram = bytes | bytearray | memoryview
"""What :meth:`SendBatch.send` takes: bytes, or a memoryview of format "B" (len is bytes)."""


class Iovec(ctypes.Structure):
    """``struct iovec`` (bits/types/struct_iovec.h)."""

    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))
    iov_base: int | None
    iov_len: int


class Msghdr(ctypes.Structure):
    """``struct msghdr`` (bits/socket.h); ctypes adds the padding after ``msg_namelen``."""

    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),  # socklen_t
        ("msg_iov", ctypes.c_void_p),  # struct iovec *
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )
    msg_name: int | None
    msg_namelen: int
    msg_iov: int | None
    msg_iovlen: int
    msg_control: int | None
    msg_controllen: int
    msg_flags: int


class Mmsghdr(ctypes.Structure):
    """``struct mmsghdr`` (bits/socket.h): a message and the bytes the call moved for it."""

    _fields_ = (("msg_hdr", Msghdr), ("msg_len", ctypes.c_uint))
    msg_hdr: Msghdr
    msg_len: int


_libc = ctypes.CDLL(None, use_errno=True)  # the C library this process already has loaded
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
_recvmmsg.restype = ctypes.c_int
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
_sendmmsg.restype = ctypes.c_int

_IOVEC = struct.Struct("@PN")  # struct iovec as struct.pack_into writes it: pointer, size_t
assert _IOVEC.size == ctypes.sizeof(Iovec)
_MMSGHDR_SIZE = ctypes.sizeof(Mmsghdr)


def _raise_errno() -> NoReturn:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code))


def _address(buffer: bytearray | mmap.mmap) -> int:
    """Where a buffer's bytes are (it must stay alive, and unresized, while used)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _headers(slots: int) -> tuple[ctypes.Array[Mmsghdr], ctypes.Array[Iovec]]:
    """``slots`` message headers, message i gathering or scattering through iovec i."""
    if not 1 <= slots <= UIO_MAXIOV:
        raise ValueError(f"slots must be 1-{UIO_MAXIOV}, not {slots}")
    headers = (Mmsghdr * slots)()
    iovecs = (Iovec * slots)()
    for index in range(slots):
        headers[index].msg_hdr.msg_iov = ctypes.addressof(iovecs[index])
        headers[index].msg_hdr.msg_iovlen = 1
    return headers, iovecs


class ReceiveBatch:
    """Up to ``slots`` datagrams per ``recvmmsg`` call, datagram i in slot i of one buffer.

    Slot i is ``view[i * slot_size : (i + 1) * slot_size]``; :meth:`datagram` cuts it to
    what arrived. Every call overwrites the slots: use (or copy) the datagrams first.
    """

    def __init__(self, slots: int, slot_size: int) -> None:
        if slot_size < 1:
            raise ValueError(f"slot_size must be positive, not {slot_size}")
        self.slots = slots
        self.slot_size = slot_size
        self._headers, self._iovecs = _headers(slots)  # the headers point into the iovecs
        self._memory = mmap.mmap(-1, slots * slot_size)  # pages resident once written
        self.view = memoryview(self._memory)
        """Every slot, back to back."""
        base = _address(self._memory)
        for index in range(slots):
            self._iovecs[index].iov_base = base + index * slot_size
            self._iovecs[index].iov_len = slot_size
        self._entries = [self._headers[index] for index in range(slots)]
        self._address = ctypes.addressof(self._headers)

    def receive(self, fd: int, flags: int = MSG_DONTWAIT) -> list[int]:
        """Receive the datagrams waiting on socket ``fd``, up to one per slot, in one call.

        Returns their sizes, in order: datagram i is in slot i. A size is at most the slot's
        unless ``flags`` has :data:`MSG_TRUNC`, when a datagram socket reports each
        datagram's real length, and a size over ``slot_size`` means that datagram was cut
        (the kernel discards the rest). Raises ``OSError`` when nothing was received
        (``BlockingIOError`` when nothing is waiting); an error met after the first datagram
        is kept by the kernel for the next call.
        """
        count: int = _recvmmsg(fd, self._address, self.slots, flags, None)
        if count < 0:
            _raise_errno()
        return [entry.msg_len for entry in self._entries[:count]]

    def truncated(self, index: int) -> bool:
        """Whether the datagram of the last :meth:`receive` in slot ``index`` was cut."""
        return bool(self._entries[index].msg_hdr.msg_flags & MSG_TRUNC)

    def datagram(self, index: int, size: int) -> memoryview:
        """Slot ``index`` cut to ``size`` bytes (the slot's size at most)."""
        start = index * self.slot_size
        return self.view[start : start + min(size, self.slot_size)]


class SendBatch:
    """Up to ``slots`` datagrams per ``sendmmsg`` call, datagram i to the address in name
    slot i.

    With ``name_size`` 0 the datagrams go to the socket's connected peer. Otherwise the caller
    writes each destination (a ``struct sockaddr_*`` of ``name_size`` bytes) into
    ``names[i * name_size : (i + 1) * name_size]`` before sending datagram i.
    """

    def __init__(self, slots: int, name_size: int = 0) -> None:
        if name_size < 0:
            raise ValueError(f"name_size must not be negative, not {name_size}")
        self.slots = slots
        self.name_size = name_size
        self._headers, self._iovecs = _headers(slots)  # the headers point into the iovecs
        self._names = bytearray(slots * name_size)
        self.names = memoryview(self._names)
        """The name slots, back to back; being exported, the array can never move."""
        if name_size:
            base = _address(self._names)
            for index in range(slots):
                self._headers[index].msg_hdr.msg_name = base + index * name_size
                self._headers[index].msg_hdr.msg_namelen = name_size
        self._address = ctypes.addressof(self._headers)

    def send(self, fd: int, datagrams: Sequence[Datagram], flags: int = MSG_DONTWAIT) -> int:
        """Send ``datagrams`` (the first ``slots`` of them) on socket ``fd`` in one call.

        Returns how many the kernel took, in order (at least one; 0 if given none). It
        stops at the first datagram it refuses and reports that refusal only when it is the
        first: send the rest again to learn it. Raises ``OSError`` when none was sent
        (``BlockingIOError`` when the send buffer is full). Writable buffers are sent where
        they lie (the kernel has copied them when the call returns); read-only ones are
        copied first.
        """
        count = min(len(datagrams), self.slots)
        if count == 0:
            return 0
        iovecs, pack_into, copies = self._iovecs, _IOVEC.pack_into, []
        offset = 0
        for datagram in datagrams[:count]:
            size = len(datagram)
            try:
                base = ctypes.addressof(ctypes.c_char.from_buffer(datagram))
            except (TypeError, ValueError):  # read-only (bytes), or empty: no address to take
                copy = ctypes.create_string_buffer(bytes(datagram), size or 1)
                copies.append(copy)  # alive until the call returns
                base = ctypes.addressof(copy)
            pack_into(iovecs, offset, base, size)
            offset += _IOVEC.size
        sent: int = _sendmmsg(fd, self._address, count, flags)
        if sent < 0:
            _raise_errno()
        return sent

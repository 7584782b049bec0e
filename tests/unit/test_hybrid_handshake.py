"""The hybrid vsock handshake's codec (pf_proxy.hybrid): the CONNECT line, and the answer
judged from the first bytes the backend sends, whole or in pieces."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pf_proxy.hybrid import (
    BAD_ANSWER,
    MAX_ANSWER,
    NEED_MORE,
    NO_LISTENER,
    Accepted,
    Refused,
    connect_request,
    read_answer,
)


def test_the_connect_line() -> None:
    assert connect_request(5000) == b"CONNECT 5000\n"
    assert connect_request(4294967295) == b"CONNECT 4294967295\n"


@pytest.mark.parametrize(
    ("data", "accepted"),
    [
        (b"OK 5000\n", Accepted(5000, 8)),  # vhost-device-vsock echoes the guest port
        (b"OK 1073741824\n", Accepted(1073741824, 14)),  # Firecracker: a host-side port
        (b"OK 0\n", Accepted(0, 5)),
        (b"OK 4294967295\n", Accepted(4294967295, 14)),
        (b"OK 7\nthe guest's first bytes", Accepted(7, 5)),  # they are the stream's, not ours
        (b"OK 7\n\n", Accepted(7, 5)),
    ],
)
def test_an_ok_line_is_accepted_and_nothing_after_it_is_taken(
    data: bytes, accepted: Accepted
) -> None:
    assert read_answer(data) == accepted
    assert read_answer(data, ended=True) == accepted


@pytest.mark.parametrize(
    "data",
    [
        b"ok 5000\n",  # lower case: not what a backend sends
        b"OK\n",
        b"OK \n",
        b"OK 5000 \n",
        b"OK  5000\n",
        b"OK 5000\r\n",
        b" OK 5000\n",  # a byte before OK
        b"OK +5\n",
        b"OK 4294967296\n",  # past u32
        b"OK 12345678901\n",
        b"\n",
        b"ERR no such port\n",
        b"HTTP/1.1 400 Bad Request\r\n",
    ],
)
def test_any_other_line_is_a_bad_answer_naming_what_was_said(data: bytes) -> None:
    judged = read_answer(data)
    assert isinstance(judged, Refused) and judged.outcome == BAD_ANSWER
    line = data.partition(b"\n")[0] + b"\n"
    assert judged.answer == f"answered {line!r} instead of OK <port>"


@pytest.mark.parametrize("data", [b"O", b"OK", b"OK ", b"OK 1", b"OK 1234567890"])
def test_the_start_of_an_ok_line_needs_more(data: bytes) -> None:
    assert read_answer(data) is NEED_MORE


@pytest.mark.parametrize("data", [b"X", b"Ok", b"OK5", b"OK 12a", b"OK 12345678901"])
def test_a_start_that_cannot_become_ok_is_bad_at_once(data: bytes) -> None:
    judged = read_answer(data)
    assert isinstance(judged, Refused) and judged.outcome == BAD_ANSWER


def test_no_newline_within_the_longest_answer_is_bad() -> None:
    judged = read_answer(b"O" * MAX_ANSWER)
    assert isinstance(judged, Refused) and judged.outcome == BAD_ANSWER


def test_a_close_before_any_byte_is_no_listener_and_after_some_a_bad_answer() -> None:
    assert read_answer(b"", ended=True) == Refused(
        NO_LISTENER, "the backend closed without answering"
    )
    assert read_answer(b"", ended=False) is NEED_MORE
    assert read_answer(b"OK 50", ended=True) == Refused(
        BAD_ANSWER, "answered b'OK 50' and closed, instead of OK <port>"
    )


@given(st.integers(0, 0xFFFFFFFF), st.binary(max_size=64), st.integers(1, 20))
def test_an_ok_line_in_any_pieces_needs_more_until_its_newline(
    number: int, tail: bytes, step: int
) -> None:
    line = b"OK %d\n" % number
    data = line + tail
    for end in range(0, len(line), step):
        assert read_answer(data[:end]) is NEED_MORE
    assert read_answer(data) == Accepted(number, len(line))


@given(st.binary(max_size=80), st.booleans())
def test_any_bytes_get_an_answer_and_only_an_ok_line_is_accepted(
    data: bytes, ended: bool
) -> None:
    judged = read_answer(data, ended)
    if isinstance(judged, Accepted):
        assert data[: judged.size] == b"OK %d\n" % judged.number
    elif judged is NEED_MORE:
        assert not ended and b"\n" not in data and len(data) < MAX_ANSWER

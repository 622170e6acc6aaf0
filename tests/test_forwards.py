"""Forward decisions (ForwardTable) and the request queue, without a reactor."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer

from hub.rules.ports import ForwardCaps
from hub.ssh.wire import (
    TcpipOpen,
    WireError,
    pack_tcpip_open,
    unpack_allocated_port,
    unpack_tcpip_open,
)
from hub.tunnel.fifo import RequestQueue
from hub.tunnel.forwards import Duplicate, Forward, ForwardTable, Lease, Refused


def granted(table: ForwardTable, bind: bytes, port: int, real: int) -> Forward:
    decision = table.request(bind, port)
    assert isinstance(decision, Lease)
    forward = decision.forward(real)
    table.add(forward)
    return forward


# -- ForwardTable -----------------------------------------------------------------

@pytest.mark.parametrize(("bind", "port", "service"), [
    (b"", 0, "ssh"), (b"localhost", 0, "ssh"), (b"http", 0, "http"), (b"App", 0, "app"),
    (b"", 22, "ssh"), (b"127.0.0.1", 443, "https"), (b"", 8080, "port-8080"),
])
def test_a_new_forward_needs_a_lease_for_its_service(bind: bytes, port: int,
                                                     service: str) -> None:
    assert ForwardTable().request(bind, port) == Lease(service, bind, port)


def test_the_same_request_again_is_a_duplicate() -> None:
    # `ssh -R 0:localhost:22 -R 0:localhost:80`: one (bind, port), two targets.
    table = ForwardTable()
    forward = granted(table, b"localhost", 0, 50001)
    assert table.request(b"localhost", 0) == Duplicate("ssh", forward)
    assert len(table) == 1
    # Cancelled, it is a new forward again.
    assert table.cancel(b"localhost", 50001) is forward
    assert table.request(b"localhost", 0) == Lease("ssh", b"localhost", 0)


@pytest.mark.parametrize("port", [65536, 2**32 - 1])
def test_a_port_above_65535_is_refused(port: int) -> None:
    assert ForwardTable().request(b"", port) == Refused(f"port {port} is above 65535")
    assert isinstance(ForwardTable().request(b"", 65535), Lease)


# -- ForwardCaps --------------------------------------------------------------------

def test_a_pending_node_gets_a_few_forwards_counted_by_lease() -> None:
    caps = ForwardCaps(pending=3, approved=16)
    assert caps.refusal("pending", 2, {"a", "b"}, "c") is None
    assert caps.refusal("pending", 3, {"a", "b", "c"}, "a") == (
        "pending nodes may hold at most 3 forwards")
    # A cancelled forward keeps its lease: no new service in its place ...
    assert caps.refusal("pending", 2, {"a", "b", "c"}, "d") == (
        "pending nodes may hold at most 3 port leases (a, b, c); approve it for more")
    # ... but the same service again.
    assert caps.refusal("pending", 2, {"a", "b", "c"}, "c") is None


def test_an_approved_node_gets_more_forwards_whatever_it_leased() -> None:
    caps = ForwardCaps(pending=3, approved=16)
    leased = {f"s{i}" for i in range(20)}
    assert caps.refusal("approved", 15, leased, "new") is None
    assert caps.refusal("approved", 16, leased, "new") == (
        "approved nodes may hold at most 16 forwards")
    assert ForwardCaps(pending=0).refusal("pending", 0, set(), "ssh") is not None


def test_a_second_forward_of_one_service_is_a_duplicate() -> None:
    table = ForwardTable()
    first = granted(table, b"localhost", 0, 50000)
    # `-R 0:a:22 -R 127.0.0.1:0:b:23`: both are service "ssh".
    assert table.request(b"127.0.0.1", 0) == Duplicate("ssh", first)
    assert table.request(b"", 22) == Duplicate("ssh", first)


def test_replies_and_channel_data() -> None:
    table = ForwardTable()
    zero = granted(table, b"localhost", 0, 50000)
    fixed = granted(table, b"http", 80, 50001)
    assert zero.reply() == (1, b"\0\0\xc3\x50")
    assert unpack_allocated_port(zero.reply()[1]) == 50000  # type: ignore[index]
    assert fixed.reply() == 1
    # forwarded-tcpip carries the bind string and the port the device asked
    # for, or the allocated one for port 0: OpenSSH finds its forward by both.
    assert unpack_tcpip_open(zero.open_data(b"203.0.113.9", 51000)) == TcpipOpen(
        b"localhost", 50000, b"203.0.113.9", 51000)
    assert unpack_tcpip_open(fixed.open_data()) == TcpipOpen(b"http", 80, b"127.0.0.1", 0)


@pytest.mark.parametrize("origin,port", [(b"127.0.0.1", 0), (b"::1", 65535), (b"", 0xFFFFFFFF)])
def test_open_data_is_the_packed_tcpip_open(origin: bytes, port: int) -> None:
    # Packed once per forward up to the originator; the same bytes as packing it whole.
    for forward in (Forward("ssh", b"", 0, 50000), Forward("http", b"http", 80, 50001)):
        assert forward.open_data(origin, port) == pack_tcpip_open(
            TcpipOpen(forward.bind, forward.channel_port, origin, port))


@pytest.mark.parametrize("port", [-1, 1 << 32])
def test_open_data_refuses_an_originator_port_no_uint32_holds(port: int) -> None:
    with pytest.raises(WireError):
        Forward("ssh", b"", 0, 50000).open_data(b"127.0.0.1", port)


def test_cancel_by_the_request_or_by_the_allocated_port() -> None:
    table = ForwardTable()
    zero = granted(table, b"", 0, 50000)
    http = granted(table, b"http", 0, 50001)
    fixed = granted(table, b"", 443, 50002)
    assert table.cancel(b"http", 50001) is http  # OpenSSH cancels port 0 this way
    assert table.cancel(b"http", 50001) is None
    assert table.cancel(b"other", 443) is None
    assert table.cancel(b"", 50002) is None  # only port-0 forwards go by their port
    assert table.cancel(b"", 443) is fixed
    assert table.cancel(b"", 0) is zero
    assert len(table) == 0


def test_holds_tells_a_forward_asked_for_again_from_the_cancelled_one() -> None:
    table = ForwardTable()
    old = granted(table, b"http", 0, 50001)
    table.cancel(b"http", 0)
    new = granted(table, b"http", 0, 50001)
    assert new == new and old != new  # identity, not value
    assert table.holds(new) and not table.holds(old)


def test_lookup_by_service_or_by_port() -> None:
    table = ForwardTable()
    ssh = granted(table, b"", 0, 50000)
    web = granted(table, b"web", 80, 50001)
    alt = granted(table, b"", 8080, 50002)
    app = granted(table, b"app", 0, 50003)
    assert table.lookup("SSH") is ssh
    assert table.lookup(22) is ssh            # the service port 22 names
    assert table.lookup(80) is web            # no http service: the port asked for
    assert table.lookup(8080) is alt          # port-8080
    assert table.lookup("port-8080") is alt
    assert table.lookup(50003) is app         # a port-0 forward by its allocated port
    assert table.lookup("http") is None and table.lookup(443) is None
    assert list(table) == [ssh, web, alt, app]
    assert table.clear() == [ssh, web, alt, app] and len(table) == 0


# -- RequestQueue ---------------------------------------------------------------

def test_requests_run_in_order_one_at_a_time() -> None:
    queue = RequestQueue()
    ran: list[str] = []
    first: defer.Deferred[str] = defer.Deferred()

    def slow() -> defer.Deferred[str]:
        ran.append("slow")
        return first

    results: list[Any] = []
    queue.run(slow).addCallback(results.append)
    queue.run(lambda: ran.append("quick") or "quick").addCallback(results.append)
    assert ran == ["slow"] and results == []
    first.callback("slow done")
    assert ran == ["slow", "quick"] and results == ["slow done", "quick"]


def test_a_failing_request_fails_alone() -> None:
    queue = RequestQueue()

    def broken() -> None:
        raise RuntimeError("listen broke")

    failures: list[Any] = []
    queue.run(broken).addErrback(failures.append)
    queue.run(lambda: defer.fail(ValueError("async"))).addErrback(failures.append)
    results: list[Any] = []
    queue.run(lambda: 1).addCallback(results.append)
    assert [f.type for f in failures] == [RuntimeError, ValueError]
    assert results == [1]


def test_requests_wait_for_what_the_queue_waits_for() -> None:
    queue = RequestQueue()
    released: defer.Deferred[None] = defer.Deferred()
    also: defer.Deferred[None] = defer.Deferred()
    queue.wait_for(released)
    queue.wait_for(also)
    results: list[Any] = []
    queue.run(lambda: "a").addCallback(results.append)
    queue.run(lambda: "b").addCallback(results.append)
    released.callback(None)
    assert results == []
    also.errback(RuntimeError("a listener would not close"))  # waited for all the same
    assert results == ["a", "b"]


def test_many_immediate_requests_do_not_recurse() -> None:
    queue = RequestQueue()
    gate: defer.Deferred[None] = defer.Deferred()
    queue.wait_for(gate)
    results: list[int] = []
    for i in range(5000):
        queue.run(lambda i=i: i).addCallback(results.append)  # type: ignore[misc]
    gate.callback(None)
    assert results == list(range(5000))


def test_a_request_queued_by_a_finishing_one_runs_after_those_queued_before() -> None:
    queue = RequestQueue()
    order: list[str] = []
    first: defer.Deferred[None] = defer.Deferred()
    queue.run(lambda: first).addCallback(
        lambda _: queue.run(lambda: order.append("third")))
    queue.run(lambda: order.append("second"))
    first.callback(None)
    assert order == ["second", "third"]

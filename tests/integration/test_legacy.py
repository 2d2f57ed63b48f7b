"""Legacy clients through dvara in front of a 2.4-era mongod: writes, getLastError and friends.

The server is mockupdb scripted as mongod 2.4 (maxWireVersion 0), the client a pre-2.6
driver speaking raw frames (both in tests/legacy_peers.py). The server records the server
connection every request arrived on, so the tests can tell where each one went.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, Iterator, NamedTuple

import pytest

from dvara_lib import wire
from dvara_lib.proxy import legacy
from tests.helpers import Dvara, RawClient, free_port, metric_sum
from tests.helpers import wait_until as _wait_until
from tests.legacy_peers import (BAD_QUERY, CURSOR_NOT_FOUND, EXHAUST, QUERY_FAILURE, LegacyClient,
                                Mongod24, Reply)


# -- fixtures and helpers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mongod() -> Iterator[Mongod24]:
    server = Mongod24()
    yield server
    server.stop()


class Proxy(NamedTuple):
    dvara: Dvara
    admin: str

    @property
    def port(self) -> int:
        return self.dvara.port

    def metric(self, measure: str) -> float:
        """A counter's total or a gauge's value (one member)."""
        return metric_sum(self.admin, measure)


def start_proxy(tmp: Any, mongod: Mongod24, *flags: str) -> Proxy:
    admin = f"127.0.0.1:{free_port()}"
    dvara = Dvara(tmp, mongod.address, "--admin-addr", admin, *flags)
    return Proxy(dvara, admin)


@pytest.fixture(scope="module")
def proxy(mongod: Mongod24, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """dvara with a pool of 4 and pins that never time out during a test."""
    started = start_proxy(tmp_path_factory.mktemp("dvara"), mongod, "--max-connections", "4",
                          "--get-last-error-timeout", "60s")
    yield started
    started.dvara.stop()


@pytest.fixture()
def clients() -> Iterator[Callable[[int], LegacyClient]]:
    opened: list[LegacyClient] = []

    def connect(port: int) -> LegacyClient:
        client = LegacyClient(port)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """helpers.wait_until, patient enough for a loaded machine."""
    return _wait_until(predicate, what, timeout)


_tags = itertools.count()


def new_tag(prefix: str) -> str:
    return f"{prefix}-{next(_tags)}"


def gle(client: LegacyClient, tag: Any = None, name: str = "getlasterror",
        **options: Any) -> dict[str, Any]:
    return client.command({name: 1, **options, "tag": tag})


def without_connection_id(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in d.items() if k != "connectionId"} for d in docs]


# -- the required load test ----------------------------------------------------------------------

def test_fifty_clients_each_get_their_own_n_on_their_own_connection(mongod, tmp_path):
    proxy = start_proxy(tmp_path, mongod, "--max-connections", "4",
                        "--pool-wait-timeout", "60s")
    rounds, n_clients = 20, 50
    failures: list[BaseException] = []
    answers: dict[str, dict[str, Any]] = {}

    def work(c: int) -> None:
        client = LegacyClient(proxy.port)
        try:
            for i in range(rounds):
                tag = f"load-{c}-{i}"
                client.insert([{"tag": tag, "k": k} for k in range(c + 1)])
                answers[tag] = gle(client, tag)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            failures.append(exc)
        finally:
            client.close()

    try:
        threads = [threading.Thread(target=work, args=(c,)) for c in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not failures, failures[:3]
        assert len(answers) == rounds * n_clients
        writes = {s.tag: s.port for s in mongod.find(kind="insert")
                  if str(s.tag).startswith("load-")}
        gles = {s.tag: s.port for s in mongod.find(kind="command", name="getlasterror")
                if str(s.tag).startswith("load-")}
        assert len(writes) == len(gles) == rounds * n_clients
        for tag, answer in answers.items():
            c = int(tag.split("-")[1])
            assert gles[tag] == writes[tag], f"{tag}: getLastError went to another connection"
            assert answer == {"n": c + 1, "connectionId": writes[tag], "err": None, "ok": 1.0}
        assert len(set(writes.values())) <= 4, "the pool opened more than --max-connections"
        assert proxy.metric("legacy.writes") == rounds * n_clients
        assert proxy.metric("gle.calls") == rounds * n_clients
        assert proxy.metric("gle.answered_by_proxy") == 0
        assert proxy.metric("gle.pins") == rounds * n_clients
        wait_until(lambda: proxy.metric("gle.pinned") == 0, "every pin given back")
    finally:
        proxy.dvara.stop()


# -- answers as mongod 2.4 gives them ------------------------------------------------------------

def _write(c: LegacyClient, tag: str, n: int = 3) -> None:
    c.insert([{"tag": tag, "k": k} for k in range(n)])


def _is_master(for_shell: Any) -> Callable[[LegacyClient, str], None]:
    def step(c: LegacyClient, tag: str) -> None:
        doc: dict[str, Any] = {"isMaster": 1}
        if for_shell is not None:
            doc["forShell"] = for_shell
        assert c.command(doc, db="admin")["ismaster"] is True
    return step


def _status_for_shell(c: LegacyClient, tag: str) -> None:
    c.command({"replSetGetStatus": 1, "forShell": 1}, db="admin")


def _find(c: LegacyClient, tag: str) -> None:
    assert c.query("test.c", {"tag": tag}).docs == []


def _failed_find(c: LegacyClient, tag: str) -> None:
    assert c.query("test.fail", {"$bogus": 1}).flags & QUERY_FAILURE


# Each step returns None, or the answer to compare: (step name, function).
STEPS: dict[str, Callable[[LegacyClient, str], Any]] = {
    "write": _write,
    "write1": lambda c, tag: _write(c, tag, 1),
    "dup": lambda c, tag: c.insert([{"tag": tag, "dup": True}]),
    "update": lambda c, tag: c.update({"tag": tag, "n": 4}, {"$set": {"x": 1}}),
    "delete": lambda c, tag: c.delete({"tag": tag, "n": 2}),
    "gle": lambda c, tag: gle(c, tag),
    "GetLastError+options": lambda c, tag: gle(c, tag, "GetLastError", w=1, wtimeout=500,
                                               j=True, fsync=False),
    "GETLASTERROR": lambda c, tag: gle(c, tag, "GETLASTERROR"),
    "getPrevError": lambda c, tag: c.command({"getPrevError": 1, "tag": tag}),
    "resetError": lambda c, tag: c.command({"resetError": 1, "tag": tag}),
    "find": _find,
    "failed find": _failed_find,
    "killCursors": lambda c, tag: c.kill_cursors(99),
    "isMaster": _is_master(None),
    "isMaster forShell": _is_master(True),
    "isMaster forShell 1": _is_master(1),
    "isMaster forShell false": _is_master(False),
    "isMaster forShell 0": _is_master(0),
    "replSetGetStatus forShell": _status_for_shell,
}

#: (steps, how many of their getLastError calls must reach the server through dvara)
SCENARIOS = {
    "no write": (["gle"], 0),
    "write then getLastError": (["write", "gle"], 1),
    "repeated getLastError is cached": (["write", "gle", "gle", "gle"], 1),
    "any case, any options": (["write1", "GetLastError+options", "GETLASTERROR"], 1),
    "two writes, the last counts": (["write", "write1", "gle"], 1),
    "write, gle, write, gle": (["write", "gle", "write1", "gle"], 2),
    "update": (["update", "gle"], 1),
    "delete": (["delete", "gle"], 1),
    "write error": (["dup", "gle", "gle"], 1),
    "intervening query clears": (["write", "find", "gle"], 0),
    "query after the answer clears it": (["write", "gle", "find", "gle"], 1),
    "isMaster clears": (["write", "isMaster", "gle"], 0),
    "isMaster forShell keeps": (["write", "isMaster forShell", "gle"], 1),
    "isMaster forShell 1 keeps": (["write", "gle", "isMaster forShell 1", "gle"], 1),
    "isMaster forShell false clears": (["write", "isMaster forShell false", "gle"], 0),
    "isMaster forShell 0 clears": (["write", "gle", "isMaster forShell 0", "gle"], 1),
    "replSetGetStatus forShell keeps": (["write", "replSetGetStatus forShell", "gle"], 1),
    "killCursors does not count": (["write", "killCursors", "gle"], 1),
    "failed query sets the error": (["write", "failed find", "gle"], 0),
    "getPrevError fresh": (["getPrevError"], 0),
    "getPrevError after a write": (["write", "getPrevError", "gle", "getPrevError"], 1),
    "getPrevError counts operations": (["dup", "gle", "find", "find", "getPrevError"], 1),
    "resetError": (["dup", "gle", "resetError", "gle", "getPrevError"], 1),
    "resetError right after a write": (["write", "resetError", "gle"], 0),
}


def run_steps(client: LegacyClient, steps: list[str], tag: str) -> list[Any]:
    return [answer for step in steps if (answer := STEPS[step](client, tag)) is not None]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_answers_are_mongod_24s(scenario, mongod, proxy, clients):
    steps, relayed = SCENARIOS[scenario]
    direct_tag, proxied_tag = new_tag("direct"), new_tag("proxied")
    expected = run_steps(clients(mongod.port), steps, direct_tag)
    answers = run_steps(clients(proxy.port), steps, proxied_tag)
    assert without_connection_id(answers) == without_connection_id(expected)
    reached = mongod.find(kind="command", name="getlasterror", tag=proxied_tag)
    assert len(reached) == relayed, [s.doc for s in reached]


def test_getlasterror_without_a_write_never_reaches_the_server(mongod, proxy, clients):
    client = clients(proxy.port)
    my_id = client.command({"isMaster": 1}, db="admin")["connectionId"]
    tag = new_tag("nowrite")
    before = proxy.metric("gle.answered_by_proxy")
    assert gle(client, tag) == {"n": 0, "connectionId": my_id, "err": None, "ok": 1.0}
    assert client.command({"getPrevError": 1}) == {"err": None, "n": 0, "nPrev": -1, "ok": 1.0}
    assert client.command({"resetError": 1}) == {"ok": 1.0}
    assert mongod.find(tag=tag) == []
    assert proxy.metric("gle.answered_by_proxy") == before + 1


def test_cached_answer_needs_no_second_round_trip(mongod, proxy, clients):
    client = clients(proxy.port)
    tag = new_tag("cached")
    _write(client, tag, 5)
    first = gle(client, tag)
    assert first["n"] == 5 and first["connectionId"] == mongod.find(tag=tag)[0].port
    for _ in range(3):
        assert gle(client, tag) == first
    assert len(mongod.find(kind="command", name="getlasterror", tag=tag)) == 1


def test_compressed_legacy_commands_reach_the_server_uncompressed(mongod, proxy, clients):
    client = clients(proxy.port)
    answer = client.command({"isMaster": 1, "compression": ["zlib"]}, db="admin")
    assert answer["compression"] == ["zlib"] and answer["maxWireVersion"] == 0
    tag = new_tag("zlib")
    _write(client, tag, 2)
    query = wire.op_query("test.$cmd", {"getlasterror": 1, "tag": tag})
    client.sock.sendall(wire.compress(query, wire.COMPRESSOR_IDS["zlib"]))
    reply, _ = wire.decompress(wire.read_frame(client.sock))
    assert wire.response_to(reply) == wire.request_id(query)
    assert wire.decode_reply(reply)[3][0]["n"] == 2
    assert mongod.find(kind="command", name="getlasterror", tag=tag)


# -- pins: time-outs, w:0 streams, clients that vanish -------------------------------------------

@pytest.fixture(scope="module")
def short_pins(mongod, tmp_path_factory) -> Iterator[Proxy]:
    """One server connection, pins released after 500 ms."""
    started = start_proxy(tmp_path_factory.mktemp("dvara"), mongod, "--max-connections", "1",
                          "--get-last-error-timeout", "500ms")
    yield started
    started.dvara.stop()


@pytest.fixture(scope="module")
def one_connection(mongod, tmp_path_factory) -> Iterator[Proxy]:
    """One server connection, pins that outlast --pool-wait-timeout (only a close frees them)."""
    started = start_proxy(tmp_path_factory.mktemp("dvara"), mongod, "--max-connections", "1",
                          "--get-last-error-timeout", "60s", "--pool-wait-timeout", "20s")
    yield started
    started.dvara.stop()


def test_getlasterror_after_the_pin_timed_out(mongod, short_pins, clients):
    client = clients(short_pins.port)
    my_id = client.command({"isMaster": 1}, db="admin")["connectionId"]
    timeouts = short_pins.metric("gle.pin_timeouts")
    tag = new_tag("late")
    _write(client, tag, 4)
    wait_until(lambda: short_pins.metric("gle.pin_timeouts") > timeouts, "the pin to time out")
    assert short_pins.metric("gle.pinned") == 0
    # The write's outcome left with its connection: "no write", never someone else's,
    # even on a connection pinned again (killCursors) that is the same one.
    client.kill_cursors(4321)
    assert gle(client, tag) == {"n": 0, "connectionId": my_id, "err": None, "ok": 1.0}
    assert client.command({"getPrevError": 1}) == {"err": None, "n": 0, "nPrev": -1, "ok": 1.0}
    assert mongod.find(kind="command", tag=tag) == []


def _query_in_thread(port: int, tag: str) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        client = LegacyClient(port)
        try:
            out.append(client.query("test.c", {"tag": tag}))
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            out.append(exc)
        finally:
            client.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_unacknowledged_stream_gives_its_connection_back_when_it_stops(mongod, short_pins,
                                                                       clients):
    writer = clients(short_pins.port)
    tag = new_tag("w0")
    timeouts = short_pins.metric("gle.pin_timeouts")
    writer.insert_stream(tag, 200)
    # The one server connection is the writer's until its stream stops for 500 ms.
    waiting, got = _query_in_thread(short_pins.port, new_tag("w0-reader"))
    waiting.join(60)
    assert got and isinstance(got[0], Reply), got
    assert short_pins.metric("gle.pin_timeouts") > timeouts
    assert len(mongod.find(kind="insert", tag=tag)) == 200
    assert len({s.port for s in mongod.find(kind="insert", tag=tag)}) == 1


def test_unacknowledged_stream_ending_with_a_read_gives_its_connection_back_at_once(
        mongod, one_connection, clients):
    writer = clients(one_connection.port)
    tag = new_tag("w0b")
    writer.insert_stream(tag, 50)
    _find(writer, tag)
    # Pins last 60 s here and the pool holds one connection: the read must have freed it.
    reader, got = _query_in_thread(one_connection.port, new_tag("w0-reader"))
    reader.join(60)
    assert got and isinstance(got[0], Reply), got
    assert one_connection.metric("gle.pin_timeouts") == 0
    wait_until(lambda: one_connection.metric("gle.pinned") == 0, "no pin left")


def test_client_killed_while_pinned(mongod, one_connection, clients):
    proxy = one_connection
    victim = clients(proxy.port)
    tag = new_tag("killed")
    _write(victim, tag, 2)
    wait_until(lambda: mongod.find(kind="insert", tag=tag), "the write to arrive")
    server_port = mongod.find(kind="insert", tag=tag)[0].port
    victim.kill()
    # The only server connection was pinned; a close (not the 60 s time-out) frees it.
    others = [clients(proxy.port) for _ in range(3)]
    for round_ in range(3):
        for i, other in enumerate(others):
            mine = new_tag(f"after-{round_}-{i}")
            _write(other, mine, i + 1)
            assert gle(other, mine) == {"n": i + 1, "connectionId": server_port, "err": None,
                                        "ok": 1.0}
    assert proxy.metric("gle.pin_timeouts") == 0


def test_a_pin_without_a_write_never_shows_another_clients_result(mongod, one_connection,
                                                                   clients):
    proxy = one_connection
    first = clients(proxy.port)
    tag = new_tag("theirs")
    _write(first, tag, 7)
    assert gle(first, tag)["n"] == 7      # the one server connection now reports n: 7 ...
    second = clients(proxy.port)
    my_id = second.command({"isMaster": 1}, db="admin")["connectionId"]
    second.kill_cursors(12345)            # ... and killCursors pins it without a write
    wait_until(lambda: proxy.metric("gle.pinned") == 1, "the killCursors pin")
    mine = new_tag("mine")
    assert gle(second, mine) == {"n": 0, "connectionId": my_id, "err": None, "ok": 1.0}
    assert mongod.find(kind="command", tag=mine) == []
    wait_until(lambda: proxy.metric("gle.pinned") == 0, "the pin to end with that message")


@pytest.mark.parametrize("step, keeps", [("isMaster", False), ("resetError", False),
                                         ("isMaster forShell", True)])
def test_pin_ends_with_the_next_message_even_one_the_proxy_answers(step, keeps, mongod,
                                                                   one_connection, clients):
    proxy = one_connection
    client = clients(proxy.port)
    tag = new_tag("spent")
    _write(client, tag, 2)
    wait_until(lambda: proxy.metric("gle.pinned") == 1, "the write's pin")
    STEPS[step](client, tag)
    if keeps:       # forShell leaves the last error alone: the getLastError still needs it
        assert proxy.metric("gle.pinned") == 1
        assert gle(client, tag)["n"] == 2
    wait_until(lambda: proxy.metric("gle.pinned") == 0, f"{step} to end the pin")
    assert proxy.metric("gle.pin_timeouts") == 0


def test_connection_with_unread_bytes_is_not_reused(mongod, one_connection, clients):
    proxy = one_connection
    victim = clients(proxy.port)
    tag = new_tag("stray")
    victim.insert([{"tag": tag, "stray": True}])
    wait_until(lambda: mongod.find(kind="insert", tag=tag), "the server to answer the write")
    spoiled = mongod.find(kind="insert", tag=tag)[0].port
    victim.kill()
    after = clients(proxy.port)
    mine = new_tag("clean")
    _write(after, mine, 3)
    answer = gle(after, mine)
    assert answer["n"] == 3 and "stray" not in answer
    assert answer["connectionId"] != spoiled, "a connection holding unread bytes was reused"
    assert mongod.find(kind="insert", tag=mine)[0].port == answer["connectionId"]


# -- cursors and reply flags ---------------------------------------------------------------------

def test_find_with_get_more_over_several_batches_and_kill_cursors(mongod, proxy, clients):
    client = clients(proxy.port)
    tag = new_tag("batches")
    first = client.query("test.big", {"total": 23, "tag": tag}, n_return=5)
    got = list(first.docs)
    cursor_id = first.cursor_id
    batches = 1
    while cursor_id:
        more = client.get_more("test.big", cursor_id, 5)
        assert more.flags == 0 and more.starting_from == 0
        got += more.docs
        cursor_id = more.cursor_id
        batches += 1
    assert [d["_id"] for d in got] == list(range(23)) and batches == 5
    # A cursor killed half-way: its getMore answers CursorNotFound, flags unchanged.
    first = client.query("test.big", {"total": 30, "tag": tag}, n_return=10)
    assert first.cursor_id and len(first.docs) == 10
    client.kill_cursors(first.cursor_id)
    wait_until(lambda: mongod.find(kind="killcursors"), "the killCursors to arrive")
    gone = client.get_more("test.big", first.cursor_id, 10)
    assert gone.flags == CURSOR_NOT_FOUND and gone.docs == [] and gone.cursor_id == 0


def test_query_failure_flag_passes_through(proxy, clients):
    failed = clients(proxy.port).query("test.fail", {"$bogus": 1})
    assert failed.flags == QUERY_FAILURE
    assert failed.docs == [{"$err": BAD_QUERY, "code": 10068}]


def test_exhaust_query_streams_every_batch_then_the_connection_is_clean(mongod, proxy,
                                                                         clients):
    client = clients(proxy.port)
    tag = new_tag("exhaust")
    request_id = client.send_query("test.big", {"total": 10, "tag": tag}, 4, EXHAUST)
    replies = [client.reply(request_id)]
    while replies[-1].cursor_id:
        replies.append(client.reply(None))
    assert [len(r.docs) for r in replies] == [4, 4, 2]
    # Nothing of the stream is left on the server connections the pool hands out next.
    for _ in range(8):
        assert clients(proxy.port).command({"ping": 1}) == {"ok": 1.0}


# -- a member too old for OP_MSG -----------------------------------------------------------------

def test_op_msg_never_reaches_a_wire_version_0_server(mongod, proxy):
    client = RawClient(proxy.port)
    try:
        hello = client.command({"hello": 1})           # answered by dvara itself
        assert hello["maxWireVersion"] == 0
        answer = client.command({"ping": 1})
        assert answer["ok"] == 0 and answer["codeName"] == "IncompatibleServerVersion"
        assert answer["code"] == legacy.INCOMPATIBLE_SERVER_VERSION
        client.send(wire.op_msg({"insert": "c", "documents": [{}], "$db": "test"},
                                flags=wire.MORE_TO_COME))
        assert client.closed_by_peer(timeout=10)
    finally:
        client.close()
    # Everything this server ever got (handshakes and monitoring included) is legacy.
    assert mongod.opcodes_seen() <= {"insert", "update", "delete", "query", "getmore",
                                     "killcursors", "command"}

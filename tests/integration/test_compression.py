"""Compression through dvara: pymongo with each compressor against SecantusDB, and the
bytes on each side captured and checked (the client side by --tee-file, the server side
by a recording relay).

SecantusDB negotiates no compressor itself (its hello answers no ``compression`` field and
it does not read OP_COMPRESSED), so --backend-compressors is tested with
tests/compressing_server.py in front of it: a relay that plays the compressing half of a
server, with SecantusDB answering behind it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import pytest
from bson import Binary
from pymongo import CursorType, MongoClient

from dvara_lib import wire
from tests.compressing_server import CompressingServer, Link
from tests.helpers import Dvara, RawClient, Secantus, wait_until

ALL = ("snappy", "zstd", "zlib")
BIG = 10 * 1024 * 1024
_IDS = {v: k for k, v in wire.COMPRESSOR_IDS.items()}


@pytest.fixture()
def front(secantus: Secantus):
    """Make a CompressingServer before SecantusDB; all are closed at teardown."""
    made: list[CompressingServer] = []

    def make(accepts: tuple[str, ...]) -> CompressingServer:
        host, port = secantus.address.rsplit(":", 1)
        made.append(CompressingServer((host, int(port)), accepts))
        return made[-1]

    yield make
    for server in made:
        server.close()


def exercise(uri: str, compressor: Optional[str], db: str) -> None:
    """CRUD, a 10 MB document both ways, and an exhaust cursor of several batches."""
    options = {"compressors": compressor} if compressor else {}
    with MongoClient(uri, serverSelectionTimeoutMS=10000, **options) as client:
        coll = client[db].c
        coll.drop()
        coll.insert_many([{"_id": i, "s": "text " * 40} for i in range(200)])
        assert coll.update_one({"_id": 3}, {"$set": {"n": 1}}).modified_count == 1
        assert coll.delete_one({"_id": 4}).deleted_count == 1
        assert coll.find_one({"_id": 3})["n"] == 1
        assert coll.count_documents({}) == 199
        payload = bytes(range(256)) * (BIG // 256)
        coll.insert_one({"_id": "big", "data": Binary(payload)})
        assert coll.find_one({"_id": "big"})["data"] == payload
        cursor = coll.find({"_id": {"$type": "int"}}, cursor_type=CursorType.EXHAUST,
                           batch_size=7).sort("_id", 1)
        assert [d["_id"] for d in cursor] == [i for i in range(200) if i != 4]


def compressors_in(frames: list[bytes]) -> set[Optional[str]]:
    """The compressor of each frame (None: sent plain)."""
    return {_IDS[wire.decompress(f)[1]] if wire.opcode(f) == wire.OP_COMPRESSED else None
            for f in frames}


def tee_frames(tee: Path) -> list[bytes]:
    return list(wire.iter_frames(tee.read_bytes()))


def command_frames(frames: list[bytes]) -> list[bytes]:
    """The frames that are no hello answer (those are plain by the spec)."""
    return [f for f in frames if not _is_hello_reply(f)]


def _is_hello_reply(frame: bytes) -> bool:
    inner = wire.decompress(frame)[0] if wire.opcode(frame) == wire.OP_COMPRESSED else frame
    doc = wire.reply_document(inner)
    return "maxWireVersion" in doc and "isWritablePrimary" in doc or "ismaster" in doc


@pytest.mark.parametrize("compressor", ALL)
def test_pymongo_with_each_compressor_against_secantus(compressor, secantus, start_dvara,
                                                       tmp_path: Path):
    tee = tmp_path / "tee.bin"
    proxy = start_dvara(secantus.address, "--tee-file", str(tee))
    exercise(proxy.uri(), compressor, f"direct_{compressor}")
    proxy.stop()
    sent = command_frames(tee_frames(tee))
    assert len(sent) > 30
    assert compressors_in(sent) == {compressor}


def test_a_client_offering_every_compressor_gets_its_first(secantus, start_dvara):
    proxy = start_dvara(secantus.address)
    with RawClient(proxy.port) as raw:
        reply = raw.command({"hello": 1, "compression": ["zstd", "lz4", "snappy", "zlib"]})
        assert reply["compression"] == ["zstd", "snappy", "zlib"]
        for name in ALL:
            ping = wire.op_msg({"ping": 1, "$db": "admin"})
            raw.send(wire.compress(ping, wire.COMPRESSOR_IDS[name]))
            answer = raw.recv_frame()
            inner, used = wire.decompress(answer)
            assert (used, wire.response_to(inner)) == (wire.COMPRESSOR_IDS[name],
                                                        wire.request_id(ping))
            assert wire.decode_msg_body(inner)["ok"] == 1.0


def pooled(links: list[Link]) -> list[Link]:
    """The connections whose handshake offered compressors (the pools' own)."""
    return [link for link in links if link.offered]


@pytest.mark.parametrize("client, offered, accepts, expected", [
    ("zstd", "snappy", ALL, "snappy"),
    ("snappy", "zlib", ALL, "zlib"),
    ("zlib", "zstd", ALL, "zstd"),
    (None, "snappy,zstd,zlib", ("zstd",), "zstd"),     # the server picks
    ("zlib", "zstd", ("snappy",), None),               # it agrees to none: plain
])
def test_backend_compressors_through_a_compressing_server(
        client, offered, accepts, expected, front: Callable[..., CompressingServer],
        start_dvara, tmp_path: Path):
    server = front(accepts)
    tee = tmp_path / "tee.bin"
    proxy: Dvara = start_dvara(server.address, "--backend-compressors", offered,
                               "--tee-file", str(tee))
    exercise(proxy.uri(), client, f"backend_{client}_{expected}")
    proxy.stop()
    links = server.all_links()
    monitors = [link for link in links if not link.offered]
    assert monitors and all(compressors_in([f for _, f in m.snapshot()]) == {None}
                            for m in monitors)
    assert pooled(links) and all(l.offered == offered.split(",") for l in pooled(links))
    frames = [f for link in pooled(links) for f in link.snapshot()[2:]]  # after the handshake
    assert len(frames) > 30
    assert {d for d, _ in frames} == {"in", "out"}
    assert compressors_in([f for _, f in frames]) == {expected}
    assert compressors_in(command_frames(tee_frames(tee))) == {client}


def test_without_the_option_pooled_connections_offer_nothing(front, start_dvara):
    server = front(ALL)
    proxy = start_dvara(server.address)
    exercise(proxy.uri(), "snappy", "backend_default")
    links = wait_until(server.all_links, "connections through the front")
    assert all(link.offered is None for link in links)
    assert compressors_in([f for link in links for _, f in link.snapshot()]) == {None}

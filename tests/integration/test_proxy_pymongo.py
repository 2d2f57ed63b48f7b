"""pymongo 4 through dvara against a real server (SecantusDB): it works as it would direct."""

from __future__ import annotations

import threading

import pytest
from bson import ObjectId
from pymongo import CursorType, MongoClient, monitoring
from pymongo.write_concern import WriteConcern

from tests.helpers import Dvara, Secantus


@pytest.fixture(scope="module")
def proxy(secantus: Secantus, tmp_path_factory: pytest.TempPathFactory):
    proxy = Dvara(tmp_path_factory.mktemp("dvara"), secantus.address, "--max-connections", "8")
    yield proxy
    proxy.stop()


@pytest.fixture()
def client(proxy: Dvara):
    client = MongoClient(proxy.uri(), serverSelectionTimeoutMS=10000)
    yield client
    client.close()


def test_hello_names_only_proxy_addresses(proxy: Dvara, secantus: Secantus, client: MongoClient):
    hello = client.admin.command("hello")
    me = f"127.0.0.1:{proxy.port}"
    assert hello["hosts"] == [me] and hello["me"] == me and hello["primary"] == me
    assert hello["setName"] == "secantus"
    assert secantus.address not in repr(hello)
    legacy = client.admin.command("isMaster")
    assert legacy["ismaster"] is True and "isWritablePrimary" not in legacy
    description = client.topology_description
    assert description.topology_type_name == "ReplicaSetWithPrimary"
    assert [addr for addr in description.server_descriptions()] == [("127.0.0.1", proxy.port)]


def test_replsetgetstatus_is_rewritten(proxy: Dvara, secantus: Secantus, client: MongoClient):
    status = client.admin.command("replSetGetStatus")
    assert [m["name"] for m in status["members"]] == [f"127.0.0.1:{proxy.port}"]
    assert secantus.address not in repr(status)


def test_crud_aggregate_count_index(client: MongoClient):
    coll = client.crud.things
    coll.drop()
    coll.insert_one({"_id": 1, "n": 1})
    coll.insert_many([{"_id": i, "n": i} for i in range(2, 11)])
    assert coll.find_one({"_id": 3})["n"] == 3
    assert coll.update_one({"_id": 1}, {"$set": {"n": 100}}).modified_count == 1
    assert coll.delete_one({"_id": 2}).deleted_count == 1
    assert coll.count_documents({}) == 9
    assert list(coll.aggregate([{"$match": {"_id": {"$lte": 4}}},
                                {"$group": {"_id": None, "s": {"$sum": "$n"}}}]))[0]["s"] == 107
    assert coll.create_index("n") == "n_1"
    assert "n_1" in coll.index_information()


def test_big_batches_and_documents(client: MongoClient):
    coll = client.big.docs
    coll.drop()
    result = coll.insert_many([{"_id": i, "v": "x" * 10} for i in range(10_000)])
    assert len(result.inserted_ids) == 10_000
    assert coll.count_documents({}) == 10_000
    blob = "b" * (15 * 1024 * 1024)
    client.big.blobs.insert_one({"_id": "blob", "data": blob})
    assert client.big.blobs.find_one({"_id": "blob"})["data"] == blob


def test_getmore_in_small_batches(client: MongoClient):
    coll = client.cursors.items
    coll.drop()
    coll.insert_many([{"_id": i} for i in range(1000)])
    ids = [doc["_id"] for doc in coll.find({}, batch_size=7).sort("_id", 1)]
    assert ids == list(range(1000))


def test_exhaust_cursor(client: MongoClient):
    coll = client.cursors.exhaust
    coll.drop()
    coll.insert_many([{"_id": i} for i in range(500)])
    docs = list(coll.find({}, cursor_type=CursorType.EXHAUST, batch_size=20))
    assert sorted(d["_id"] for d in docs) == list(range(500))
    assert client.admin.command("ping")["ok"] == 1.0


def test_unacknowledged_writes_then_read(client: MongoClient):
    coll = client.w0.get_collection("c", write_concern=WriteConcern(w=0))
    coll.drop()
    for i in range(200):
        coll.insert_one({"_id": i})
    assert client.w0.c.count_documents({}) == 200


def test_transaction_and_retryable_write(client: MongoClient):
    coll = client.txn.accounts
    coll.drop()
    coll.insert_many([{"_id": "a", "v": 100}, {"_id": "b", "v": 0}])
    with client.start_session() as session:
        with session.start_transaction():
            coll.update_one({"_id": "a"}, {"$inc": {"v": -10}}, session=session)
            coll.update_one({"_id": "b"}, {"$inc": {"v": 10}}, session=session)
    assert {d["_id"]: d["v"] for d in coll.find()} == {"a": 90, "b": 10}
    with client.start_session() as session:
        with session.start_transaction():
            coll.update_one({"_id": "a"}, {"$inc": {"v": -50}}, session=session)
            session.abort_transaction()
    assert coll.find_one({"_id": "a"})["v"] == 90



def test_retryable_write_carries_a_transaction_number(proxy: Dvara):
    listener = _InsertListener()
    with MongoClient(proxy.uri(retryWrites="true"), serverSelectionTimeoutMS=10000,
                     event_listeners=[listener]) as client:
        oid = ObjectId()
        client.txn.retry.insert_one({"_id": oid})
        assert client.txn.retry.find_one({"_id": oid}) is not None
    sent = listener.inserts[-1]
    assert sent["txnNumber"] >= 1 and "lsid" in sent   # the server accepted a retryable write


class _InsertListener(monitoring.CommandListener):
    def __init__(self) -> None:
        self.inserts: list[dict] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "insert":
            self.inserts.append(dict(event.command))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_compression_zlib(proxy: Dvara):
    with MongoClient(proxy.uri(compressors="zlib"), serverSelectionTimeoutMS=10000) as client:
        coll = client.comp.c
        coll.drop()
        coll.insert_many([{"_id": i, "s": "z" * 1000} for i in range(100)])
        assert coll.count_documents({}) == 100
        assert len(list(coll.find())) == 100


def test_sessions_and_cursors_across_threads(client: MongoClient):
    coll = client.threads.c
    coll.drop()
    coll.insert_many([{"_id": i} for i in range(300)])
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(3):
                assert len(list(coll.find({}, batch_size=50))) == 300
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors

"""The legacy half of the relay in process: how mongod 2.4's last error is kept and read
(the end-to-end behaviour against a scripted 2.4 mongod is tests/integration/test_legacy.py)."""

from __future__ import annotations

import bson
import pytest

from dvara_lib import wire
from dvara_lib.proxy import legacy, session
from tests.legacy_peers import DUP_KEY


@pytest.mark.parametrize("value, expected", [
    (None, False), (False, False), (0, False), (0.0, False), (bson.Int64(0), False),
    (bson.Decimal128("0"), False), (True, True), (1, True), (-2.5, True), ("", True),
    ("no", True), ({}, True), ([], True)])
def test_for_shell_is_read_as_mongod_reads_it(value, expected):
    assert legacy._true_value(value) is expected


def test_prev_error_from_a_kept_reply():
    state = session.LastError()
    assert legacy.prev_error_doc(state) == {"err": None, "n": 0, "nPrev": -1, "ok": 1.0}
    state.reply = wire.op_reply([{"err": DUP_KEY, "code": 11000, "n": 0, "connectionId": 9,
                                  "ok": 1.0}], 1)
    state.nprev = 3
    assert legacy.prev_error_doc(state) == {"err": DUP_KEY, "code": 11000, "n": 0, "nPrev": 3,
                                            "ok": 1.0}

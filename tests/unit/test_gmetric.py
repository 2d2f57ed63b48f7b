"""The gmetric XDR encoder's packet layout and its refusals (the byte-for-byte comparison
with Debian's gmetric and a real gmond is tests/integration/test_gmetric.py)."""

from __future__ import annotations

import struct

import pytest

from dvara_lib.observe.gmetric import encode_metadata, encode_metric, encode_value


def test_native_value_packets_layout():
    head = encode_value("n", 0, "string", hostname="h")[4:24]  # host, name, spoof flag
    assert encode_value("n", 7, "uint32", hostname="h", native=True) == \
        struct.pack(">I", 132) + head + b"\0\0\0\x02%u\0\0" + struct.pack(">I", 7)
    assert encode_value("n", -7, "int32", hostname="h", native=True)[-4:] == struct.pack(">i", -7)
    f32 = encode_value("n", 1.5, "float", hostname="h", native=True)
    assert f32[:4] == struct.pack(">I", 134) and f32[-4:] == struct.pack(">f", 1.5)
    f64 = encode_value("n", 1.5, "double", hostname="h", native=True)
    assert f64[:4] == struct.pack(">I", 135) and f64[-8:] == struct.pack(">d", 1.5)
    for type_, packet_id in (("uint16", 129), ("int16", 130), ("int32", 131)):
        packet = encode_value("n", 5, type_, hostname="h", native=True)
        assert struct.unpack(">I", packet[:4]) == (packet_id,)


@pytest.mark.parametrize("value,type_", [(-1, "uint32"), (2**32, "uint32"), (2**31, "int32"),
                                         (float("nan"), "float"), (float("inf"), "double"),
                                         (1, "int64")])
def test_bad_values_raise_value_error(value, type_):
    with pytest.raises(ValueError):
        encode_metric("x", value, type_)


def test_bad_slope_raises_value_error():
    with pytest.raises(ValueError):
        encode_metadata("x", "uint32", slope="sideways")

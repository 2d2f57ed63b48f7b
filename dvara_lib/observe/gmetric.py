"""Encode one metric as the two Ganglia 3.x UDP packets (XDR) that gmetric sends."""

from __future__ import annotations

import math
import socket
import struct
from typing import Iterable, Optional, Union

# Layout (XDR, big-endian, every field padded to 4 bytes), as /usr/bin/gmetric
# 3.7.2 sends it; tests/integration/test_gmetric.py checks it byte for byte.
#
#   metadata:  u32 128 (gmetadata_full)
#              metric_id = string host, string name, bool spoof
#              string type, string name, string units,
#              u32 slope, u32 tmax, u32 dmax,
#              u32 count, count x (string key, string value)
#   value:     u32 id, metric_id, string fmt, value
#
# gmetric itself always sends the value as text (id 133, fmt "%s"); gmond
# parses it by the type in the metadata.  The typed packets (129..135) are
# what gmond's own modules send; ``native=True`` builds those instead.

METADATA_FULL = 128
STRING_VALUE = 133

SLOPES = {"zero": 0, "positive": 1, "negative": 2, "both": 3, "unspecified": 4, "derivative": 5}

# type -> (value packet id, printf format gmond uses for VAL, struct code)
_NATIVE = {
    "uint16": (129, "%hu", ">I"),
    "int16": (130, "%hd", ">i"),
    "int32": (131, "%d", ">i"),
    "uint32": (132, "%u", ">I"),
    "string": (133, "%s", None),
    "float": (134, "%f", ">f"),
    "double": (135, "%lf", ">d"),
}
_INT_RANGES = {
    "int8": (-(2**7), 2**7 - 1),
    "uint8": (0, 2**8 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}
TYPES = ("string", "int8", "uint8", "int16", "uint16", "int32", "uint32", "float", "double")

_U32 = struct.Struct(">I")
Value = Union[int, float, str]


def default_hostname() -> str:
    """Return the host name gmetric would put in its packets (gethostname())."""
    return socket.gethostname()


def _xdr_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return _U32.pack(len(data)) + data + b"\0" * (-len(data) % 4)


def _metric_id(hostname: str, name: str, spoof: bool) -> bytes:
    return _xdr_string(hostname) + _xdr_string(name) + _U32.pack(1 if spoof else 0)


def format_value(value: Value, type_: str) -> str:
    """Return ``value`` as the text gmetric would send for ``type_``.

    Integers print in decimal, floats as Python's shortest round-trip text
    (``repr``), strings as they are.  Can raise ValueError for an unknown
    type, an integer out of the type's range, or a float that is not finite.
    """
    if type_ == "string":
        return str(value)
    if type_ in _INT_RANGES:
        number = int(value)
        low, high = _INT_RANGES[type_]
        if not low <= number <= high:
            raise ValueError(f"{value!r} is out of range for {type_}")
        return str(number)
    if type_ in ("float", "double"):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{value!r} is not a finite number")
        return repr(number)
    raise ValueError(f"unknown Ganglia type {type_!r}; expected one of {', '.join(TYPES)}")


def _groups(group: Union[str, Iterable[str], None]) -> list[str]:
    if group is None:
        return []
    if isinstance(group, str):
        return [g for g in group.split(",") if g]
    return list(group)


def _extra_data(spoof: Optional[str], groups: list[str], cluster: Optional[str],
                desc: Optional[str], title: Optional[str]) -> list[tuple[str, str]]:
    """Return the key/value pairs in the order gmetric adds them."""
    pairs: list[tuple[str, str]] = []
    if spoof:
        pairs.append(("SPOOF_HOST", spoof))
    if cluster:
        pairs.append(("CLUSTER", cluster))
    pairs.extend(("GROUP", g) for g in groups)
    if desc:
        pairs.append(("DESC", desc))
    if title:
        pairs.append(("TITLE", title))
    return pairs


def encode_metadata(name: str, type_: str, units: str = "", slope: str = "both",
                    tmax: int = 60, dmax: int = 0, group: Union[str, Iterable[str], None] = None,
                    hostname: Optional[str] = None, spoof: Optional[str] = None,
                    title: Optional[str] = None, desc: Optional[str] = None,
                    cluster: Optional[str] = None) -> bytes:
    """Return the gmetadata_full packet (id 128) for one metric.

    Can raise ValueError for an unknown type or slope.
    """
    if type_ not in TYPES:
        raise ValueError(f"unknown Ganglia type {type_!r}; expected one of {', '.join(TYPES)}")
    if slope not in SLOPES:
        raise ValueError(f"unknown Ganglia slope {slope!r}; expected one of {', '.join(SLOPES)}")
    host = spoof if spoof else (hostname or default_hostname())
    pairs = _extra_data(spoof, _groups(group), cluster, desc, title)
    parts = [
        _U32.pack(METADATA_FULL), _metric_id(host, name, bool(spoof)),
        _xdr_string(type_), _xdr_string(name), _xdr_string(units),
        _U32.pack(SLOPES[slope]), _U32.pack(int(tmax)), _U32.pack(int(dmax)),
        _U32.pack(len(pairs)),
    ]
    for key, val in pairs:
        parts.append(_xdr_string(key) + _xdr_string(val))
    return b"".join(parts)


def encode_value(name: str, value: Value, type_: str, hostname: Optional[str] = None,
                 spoof: Optional[str] = None, native: bool = False) -> bytes:
    """Return the value packet for one metric.

    By default the value travels as text (id 133, "%s"), exactly as gmetric
    sends it.  With ``native`` it travels in the typed packet for ``type_``
    (uint16 129, int16 130, int32 131, uint32 132, string 133, float 134,
    double 135).  Can raise ValueError as format_value() does, or for a type
    that has no native packet (int8, uint8).
    """
    host = spoof if spoof else (hostname or default_hostname())
    head = _metric_id(host, name, bool(spoof))
    text = format_value(value, type_)
    if not native or type_ == "string":
        return _U32.pack(STRING_VALUE) + head + _xdr_string("%s") + _xdr_string(text)
    if type_ not in _NATIVE:
        raise ValueError(f"Ganglia type {type_!r} has no native value packet")
    packet_id, fmt, code = _NATIVE[type_]
    number = float(text) if type_ in ("float", "double") else int(text)
    return _U32.pack(packet_id) + head + _xdr_string(fmt) + struct.pack(code, number)


def encode_metric(name: str, value: Value, type_: str, units: str = "", slope: str = "both",
                  tmax: int = 60, dmax: int = 0, group: Union[str, Iterable[str], None] = None,
                  hostname: Optional[str] = None, spoof: Optional[str] = None,
                  title: Optional[str] = None, desc: Optional[str] = None,
                  cluster: Optional[str] = None, native: bool = False) -> tuple[bytes, bytes]:
    """Return (metadata packet, value packet) for one metric, as gmetric builds them.

    ``hostname`` defaults to socket.gethostname(), as gmetric's; ``spoof`` is
    gmetric's ``-S ip:host`` (it replaces the host name and adds SPOOF_HOST).
    ``group`` is a comma-separated string or a list (one GROUP pair each).
    Can raise ValueError for an unknown type or slope or a value that does
    not fit the type.
    """
    meta = encode_metadata(name, type_, units, slope, tmax, dmax, group, hostname,
                           spoof, title, desc, cluster)
    return meta, encode_value(name, value, type_, hostname, spoof, native)

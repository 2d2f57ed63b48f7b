"""Our gmetric encoder against Debian's /usr/bin/gmetric (byte for byte) and a real gmond."""

from __future__ import annotations

import socket

import pytest

from dvara_lib.observe.gmetric import encode_metric, format_value
from tests.ganglia_harness import Gmond, capture_gmetric

# (type, value we encode, the text we give gmetric, units, slope, tmax, dmax, group)
CASES = [
    ("uint32", 0, "0", "req/s", "both", 60, 0, "dvara"),
    ("uint32", 1, "1", "conns", "positive", 20, 120, "dvara"),
    ("uint32", 123456, "123456", "bytes", "zero", 30, 300, "dvara"),
    ("uint32", 4294967295, "4294967295", "bytes", "both", 86400, 0, "dvara"),
    ("int32", 0, "0", "clients", "both", 20, 200, "dvara"),
    ("int32", -1, "-1", "clients", "negative", 20, 200, "dvara"),
    ("int32", -2147483648, "-2147483648", "x", "both", 60, 0, "g1"),
    ("int32", 2147483647, "2147483647", "x", "derivative", 60, 0, "dvara"),
    ("float", 0.0, "0.0", "req/s", "both", 20, 200, "dvara"),
    ("float", 1.5, "1.5", "ms", "both", 20, 200, "dvara"),
    ("float", 0.1, "0.1", "req/s", "positive", 20, 200, "dvara"),
    ("float", 123456.789, "123456.789", "bytes/s", "both", 20, 200, "dvara"),
    ("float", -2.25, "-2.25", "ms", "both", 20, 200, "dvara"),
    ("float", 1e-05, "1e-05", "ms", "both", 20, 200, "dvara"),
    ("double", 0.0, "0.0", "ms", "both", 20, 200, "dvara"),
    ("double", 3.141592653589793, "3.141592653589793", "ms", "both", 20, 200, "dvara"),
    ("double", 1e300, "1e+300", "ms", "zero", 20, 200, "dvara"),
    ("double", 7, "7.0", "conns", "both", 20, 200, "dvara"),
    ("string", "hello world", "hello world", "", "zero", 60, 0, "dvara"),
    ("string", "0.1.0", "0.1.0", "", "both", 60, 0, "dvara"),
    ("string", "", "", "", "both", 60, 0, "dvara"),
]


def _gmetric_args(name: str, text: str, type_: str, units: str, slope: str, tmax: int,
                  dmax: int, group: str) -> list[str]:
    return ["-n", name, "-v", text, "-t", type_, "-u", units, "-s", slope,
            "-x", str(tmax), "-d", str(dmax), "-g", group]


@pytest.mark.parametrize("type_,value,text,units,slope,tmax,dmax,group", CASES)
def test_matches_gmetric_byte_for_byte(tmp_path, type_, value, text, units, slope, tmax, dmax,
                                       group):
    name = f"mongoproxy.127.0.0.1.test_{type_}"
    args = _gmetric_args(name, text, type_, units, slope, tmax, dmax, group)
    expected = capture_gmetric(tmp_path, args)
    ours = encode_metric(name, value, type_, units=units, slope=slope, tmax=tmax, dmax=dmax,
                         group=group)
    assert format_value(value, type_) == text
    assert ours[0] == expected[0], "metadata packet differs"
    assert ours[1] == expected[1], "value packet differs"


def test_gmetric_defaults_match(tmp_path):
    """No units/slope/tmax/dmax/group: gmetric's defaults are ours (both, 60, 0)."""
    expected = capture_gmetric(tmp_path, ["-n", "plain", "-v", "42", "-t", "uint32"])
    assert encode_metric("plain", 42, "uint32") == expected


def test_spoof_title_desc_cluster_and_groups_match(tmp_path):
    args = ["-n", "m", "-v", "-5", "-t", "int32", "-u", "u", "-s", "zero", "-g", "dvara,pool",
            "-S", "10.1.2.3:proxyhost", "-T", "A title", "-D", "Some description", "-C", "clus"]
    expected = capture_gmetric(tmp_path, args)
    ours = encode_metric("m", -5, "int32", units="u", slope="zero", group="dvara,pool",
                         spoof="10.1.2.3:proxyhost", title="A title", desc="Some description",
                         cluster="clus")
    assert ours == expected
    assert encode_metric("m", -5, "int32", units="u", slope="zero", group=["dvara", "pool"],
                         spoof="10.1.2.3:proxyhost", title="A title", desc="Some description",
                         cluster="clus") == expected


def test_hostname_is_gethostname_like_gmetric(tmp_path):
    meta, value = capture_gmetric(tmp_path, ["-n", "h", "-v", "1", "-t", "uint32"])
    host = socket.gethostname().encode()
    assert meta[8:8 + len(host)] == host
    assert encode_metric("h", 1, "uint32", hostname="other")[0] != meta


GMOND_CASES = [
    ("g.u32", 4294967295, "uint32", "bytes", "4294967295"),
    ("g.u32zero", 0, "uint32", "req", "0"),
    ("g.i32", -2147483648, "int32", "clients", "-2147483648"),
    ("g.float", 0.1, "float", "req/s", "0.1"),
    ("g.double", 3.141592653589793, "double", "ms", "3.141592653589793"),
    ("g.string", "hello world", "string", "", "hello world"),
]


def test_real_gmond_shows_our_metrics(tmp_path):
    gmond = Gmond(tmp_path)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for name, value, type_, units, _ in GMOND_CASES:
                for packet in encode_metric(name, value, type_, units=units, slope="both",
                                            tmax=20, dmax=300, group="dvara", desc="d " + name):
                    sock.sendto(packet, gmond.udp_addr)
                for packet in encode_metric("native." + name, value, type_, units=units,
                                            group="dvara", native=True):
                    sock.sendto(packet, gmond.udp_addr)
        names = {c[0] for c in GMOND_CASES} | {"native." + c[0] for c in GMOND_CASES}
        found = gmond.wait_for(names)
    finally:
        gmond.close()
    for name, value, type_, units, val in GMOND_CASES:
        metric = found[name]
        assert (metric["VAL"], metric["TYPE"], metric["UNITS"]) == (val, type_, units)
        assert (metric["SLOPE"], metric["TMAX"], metric["DMAX"]) == ("both", "20", "300")
        assert metric["EXTRA"]["GROUP"] == "dvara"
        assert metric["EXTRA"]["DESC"] == "d " + name
        native = found["native." + name]
        assert (native["TYPE"], native["UNITS"]) == (type_, units)
        assert float(native["VAL"]) == pytest.approx(value, rel=1e-6) if type_ != "string" \
            else native["VAL"] == value

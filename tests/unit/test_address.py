"""host:port parsing and writing (dvara_lib.address)."""

from __future__ import annotations

import pytest

from dvara_lib.address import format_address, normalize, parse_address, parse_option
from dvara_lib.errors import ConfigError


@pytest.mark.parametrize("text, expected", [
    ("db1.example:27018", ("db1.example", 27018)),
    ("DB1.Example:27018", ("db1.example", 27018)),
    ("  db1.example:27018 ", ("db1.example", 27018)),
    ("db1.example", ("db1.example", 27017)),
    ("10.0.0.1:1", ("10.0.0.1", 1)),
    ("[::1]:27019", ("::1", 27019)),
    ("[FE80::1]:27019", ("fe80::1", 27019)),
    ("[::1]", ("::1", 27017)),
    ("::1", ("::1", 27017)),
    ("2001:db8::5", ("2001:db8::5", 27017)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("host, port, expected", [
    ("db1.example", 27017, "db1.example:27017"),
    ("10.0.0.1", 1, "10.0.0.1:1"),
    ("::1", 27019, "[::1]:27019"),
    ("2001:db8::5", 27017, "[2001:db8::5]:27017"),
])
def test_format_address_round_trips(host, port, expected):
    assert format_address(host, port) == expected
    assert parse_address(expected) == (host, port)


def test_normalize():
    assert normalize("DB1.example") == "db1.example:27017"
    assert normalize("[::1]") == "[::1]:27017"
    assert normalize("::1") == "[::1]:27017"


def test_an_option_value_names_the_option():
    assert parse_option("[::1]:8649", "--x") == ("::1", 8649)
    assert parse_option("gmond", "--ganglia", 8649) == ("gmond", 8649)
    with pytest.raises(ConfigError, match="--admin-addr: address 'nohost' needs a port"):
        parse_option("nohost", "--admin-addr")

"""Tests for dvara_lib.config: defaults, value forms, precedence and error messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dvara_lib import config
from dvara_lib.address import parse_address
from dvara_lib.config import (Settings, check_port_range, describe, parse_args, parse_duration,
                              parse_size)
from dvara_lib.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
OPTION_NAMES = [opt.name for opt in config._OPTIONS]


def parse(*argv: str, env: dict[str, str] | None = None) -> Settings:
    """Parse with an empty environment unless one is given."""
    return parse_args(list(argv), env={} if env is None else env)


def write_conf(tmp_path: Path, text: str, name: str = "dvara.conf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def parse_error(capsys: pytest.CaptureFixture[str], *argv: str, env: dict[str, str] | None = None) -> str:
    """Parse, expect exit status 2, and return the single stderr line."""
    with pytest.raises(SystemExit) as info:
        parse(*argv, env=env)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dvara: error: ")
    assert err.count("\n") == 1, err
    return err.strip()


# ---------------------------------------------------------------- defaults


def test_defaults() -> None:
    s = parse()
    assert s == Settings(
        config_file=None,
        addrs=(("localhost", 27017),),
        listen_host="127.0.0.1",
        advertise_host="127.0.0.1",
        port_start=6000,
        port_end=6010,
        max_connections=100,
        min_idle_connections=0,
        max_client_connections=20000,
        max_per_client_connections=10000,
        workers=32,
        processes=1,
        cpu_affinity="auto",
        max_buffered_bytes=1024 ** 3,
        worker_linger=0.001,
        message_timeout=120.0,
        client_idle_timeout=3600.0,
        server_idle_timeout=3600.0,
        pool_wait_timeout=10.0,
        discovery_interval=5.0,
        get_last_error_timeout=60.0,
        metrics_interval=10.0,
        graceful_timeout=30.0,
        pidfile=None,
        log_level="info",
        log_file=None,
        state_file=None,
        tee_file=None,
        member_map=(),
        ganglia=(),
        admin_addr=None,
        demo=False,
        demo_port=27017,
        demo_data_dir=".demo-data",
        username=None,
        password=None,
        password_file=None,
        auth_source="admin",
        auth_mechanism="SCRAM-SHA-256",
        client_auth_file=None,
        auth_failure_limit=10,
        tls_mode="disabled",
        tls_cert_file=None,
        tls_key_file=None,
        tls_ca_file=None,
        tls_require_client_cert=False,
        backend_tls=False,
        backend_tls_ca_file=None,
        backend_tls_cert_file=None,
        backend_tls_key_file=None,
    )


def test_settings_are_frozen() -> None:
    s = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_connections = 5  # type: ignore[misc]


def test_every_setting_has_an_option() -> None:
    dests = {name.replace("-", "_") for name in OPTION_NAMES} | {"config_file"}
    assert dests == {f.name for f in dataclasses.fields(Settings)}


def test_help_lists_every_option_with_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse("--help")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dvara")
    for name in OPTION_NAMES:
        assert f"--{name}" in out
        assert f"DVARA_{name.replace('-', '_').upper()}" in out
    assert out.count("[default:") == len(OPTION_NAMES) + 1  # + --config


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("12", 12.0),
        ("1.5", 1.5),
        (".25", 0.25),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        ("1h30m", 5400.0),
        (" 10S ", 10.0),
        ("-5s", -5.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "abc", "5x", "1.2.3", "ms5", "5 s", "1e3", "inf", "nan", "--5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text, size", [("64MB", 64 << 20), ("1GB", 1 << 30), ("512kb", 512 << 10),
                                        ("1.5G", 3 << 29), ("2048", 2048), (" 2m ", 2 << 20),
                                        ("1 MB", 1 << 20)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "1TB", "-1MB", "1.2.3MB", "x"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_max_buffered_bytes_must_be_at_least_a_megabyte(capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(capsys, "--max-buffered-bytes", "512KB")
    assert err.startswith("dvara: error: --max-buffered-bytes: must be at least 1MB")


@pytest.mark.parametrize(
    "name", [n for n in OPTION_NAMES if n.endswith(("-timeout", "-interval"))]
)
def test_duration_options_accept_every_form(name: str) -> None:
    dest = name.replace("-", "_")
    for text, seconds in [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("7", 7.0)]:
        assert getattr(parse(f"--{name}", text), dest) == seconds


@pytest.mark.parametrize("value", ["0", "0s", "-1s", "-3"])
def test_duration_must_be_positive(capsys: pytest.CaptureFixture[str], value: str) -> None:
    err = parse_error(capsys, f"--pool-wait-timeout={value}")
    assert err == f"dvara: error: --pool-wait-timeout: must be > 0, got {value!r}"


def test_bad_duration_names_option(capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(capsys, "--message-timeout", "soon")
    assert err.startswith("dvara: error: --message-timeout: expected a duration")
    assert "'soon'" in err


# ---------------------------------------------------------------- precedence


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "max-connections = 4\nworkers = 5\nlog-level = DEBUG\n")
    env = {"DVARA_MAX_CONNECTIONS": "7", "DVARA_WORKERS": "8"}
    s = parse("-c", conf, "--max-connections", "9", env=env)
    assert s.max_connections == 9  # flag beats env and file
    assert s.workers == 8  # env beats file
    assert s.log_level == "debug"  # file beats default
    assert s.message_timeout == 120.0  # default
    assert s.config_file == conf


def test_config_path_from_env(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "port-start = 7000\nport-end = 7002\n")
    s = parse(env={"DVARA_CONFIG": conf})
    assert (s.config_file, s.port_start, s.port_end) == (conf, 7000, 7002)


def test_config_file_syntax(tmp_path: Path) -> None:
    text = (
        "# a comment\n"
        "; another comment\n"
        "\n"
        "max-connections = 4   # trailing comment\n"
        'log-file = "/tmp/dvara log.txt"\n'
        "--workers = 3\n"
        "demo = true\n"
        "demo-data-dir: /tmp/demo\n"
    )
    s = parse("-c", write_conf(tmp_path, text))
    assert s.max_connections == 4
    assert s.log_file == "/tmp/dvara log.txt"
    assert s.workers == 3
    assert s.demo is True
    assert s.demo_data_dir == "/tmp/demo"


@pytest.mark.parametrize("source", ["flag", "env", "file"])
def test_demo_flag_sources(tmp_path: Path, source: str) -> None:
    if source == "flag":
        assert parse("--demo").demo is True
    elif source == "env":
        assert parse(env={"DVARA_DEMO": "true"}).demo is True
    else:
        assert parse("-c", write_conf(tmp_path, "demo = true\n")).demo is True


def test_env_false_overrides_file_true(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "demo = true\n")
    assert parse("-c", conf, env={"DVARA_DEMO": "false"}).demo is False


def test_unrelated_env_vars_are_ignored() -> None:
    assert parse(env={"DVARA_NOT_AN_OPTION": "1", "MAX_CONNECTIONS": "1"}).max_connections == 100


# ---------------------------------------------------------------- errors


def test_negative_size_names_option(capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(capsys, "--max-connections", "-3")
    assert err == "dvara: error: --max-connections: must be >= 1, got -3"


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--min-idle-connections=-1"], "--min-idle-connections"),
        (["--max-client-connections=0"], "--max-client-connections"),
        (["--max-per-client-connections=0"], "--max-per-client-connections"),
        (["--workers=0"], "--workers"),
        (["--workers=many"], "--workers"),
        (["--port-start=0"], "--port-start"),
        (["--port-end=65536"], "--port-end"),
        (["--demo-port=http"], "--demo-port"),
        (["--log-level=loud"], "--log-level"),
        (["--listen-host="], "--listen-host"),
        (["--demo-data-dir="], "--demo-data-dir"),
    ],
)
def test_bad_values_name_option(capsys: pytest.CaptureFixture[str], argv: list[str], option: str) -> None:
    assert parse_error(capsys, *argv).startswith(f"dvara: error: {option}: ")


def test_bad_env_value_names_option_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(capsys, env={"DVARA_MAX_CONNECTIONS": "-3"})
    assert "--max-connections" in err
    assert "DVARA_MAX_CONNECTIONS" in err
    assert "must be >= 1, got -3" in err


def test_bad_file_value_names_option_and_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "graceful-timeout = forever\n")
    err = parse_error(capsys, "-c", conf)
    assert "--graceful-timeout" in err
    assert conf in err


def test_unknown_key_in_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "workers = 2\nmax-conections = 4\n")
    err = parse_error(capsys, "-c", conf)
    assert f"{conf} line 2: unknown key 'max-conections'" in err
    assert "did you mean 'max-connections'" in err


def test_duplicate_key_in_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "workers = 2\nworkers = 3\n")
    assert "key 'workers' is set twice" in parse_error(capsys, "-c", conf)


def test_missing_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "nope.conf" in parse_error(capsys, "-c", str(tmp_path / "nope.conf"))


def test_unknown_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--max-conns" in parse_error(capsys, "--max-conns", "3")


def test_abbreviated_flag_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--max-conn" in parse_error(capsys, "--max-conn", "3")


def test_port_start_above_end(capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(capsys, "--port-start", "7000")
    assert err == "dvara: error: --port-start/--port-end: start 7000 is above end 6010"


def test_min_idle_above_max(capsys: pytest.CaptureFixture[str]) -> None:
    err = parse_error(capsys, "--max-connections", "5", "--min-idle-connections", "6")
    assert err.startswith("dvara: error: --min-idle-connections: must be <= --max-connections (5)")


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    "text, addrs",
    [
        ("Host1:27018,host2", (("host1", 27018), ("host2", 27017))),
        ("db.example.com", (("db.example.com", 27017),)),
        ("[::1]:27019", (("::1", 27019),)),
        ("[::1]", (("::1", 27017),)),
        ("::1", (("::1", 27017),)),
        ("[FE80::1]:1,10.0.0.1:2", (("fe80::1", 1), ("10.0.0.1", 2))),
        (" a:1 , , a:1 ,b:2 ", (("a", 1), ("b", 2))),
    ],
)
def test_addrs(text: str, addrs: tuple[tuple[str, int], ...]) -> None:
    assert parse("--addrs", text).addrs == addrs


@pytest.mark.parametrize("text", ["", ",", "h:", "h:x", "h:0", "h:70000", "[::1", "[::1]x", "a b:1"])
def test_bad_addrs(capsys: pytest.CaptureFixture[str], text: str) -> None:
    assert parse_error(capsys, f"--addrs={text}").startswith("dvara: error: --addrs: ")


def test_parse_address_without_default_port() -> None:
    assert parse_address("[::1]:9", default_port=None) == ("::1", 9)
    with pytest.raises(ValueError, match="needs a port"):
        parse_address("localhost", default_port=None)


def test_admin_addr() -> None:
    assert parse("--admin-addr", "LOCALHOST:8080").admin_addr == ("localhost", 8080)
    assert parse("--admin-addr", "[::1]:8080").admin_addr == ("::1", 8080)


def test_admin_addr_needs_port(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--admin-addr" in parse_error(capsys, "--admin-addr", "localhost")


def test_advertise_host_defaults_to_listen_host() -> None:
    assert parse("--listen-host", "10.1.2.3").advertise_host == "10.1.2.3"
    assert parse("--listen-host", "0.0.0.0", "--advertise-host", "Proxy.Example").advertise_host == "proxy.example"


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::"])
def test_advertise_host_for_wildcard_listen(monkeypatch: pytest.MonkeyPatch, wildcard: str) -> None:
    monkeypatch.setattr(config.socket, "gethostname", lambda: "MyBox")
    s = parse("--listen-host", wildcard)
    assert (s.listen_host, s.advertise_host) == (wildcard, "mybox")


# ---------------------------------------------------------------- member map and ganglia


def test_member_map() -> None:
    s = parse("--member-map", "DB1:27017=6001, [::1]:27018=6002,db3=6003")
    assert s.member_map == ((("db1", 27017), 6001), (("::1", 27018), 6002), (("db3", 27017), 6003))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("db1:27017", "expected real-host:port=proxy-port"),
        ("=6001", "expected real-host:port=proxy-port"),
        ("db1:27017=x", "proxy port"),
        ("db1:27017=0", "proxy port"),
        ("db1=6001,db1:27017=6002", "member mapped twice: db1:27017"),
        ("db1=6001,db2=6001", "proxy port mapped twice: 6001"),
    ],
)
def test_bad_member_map(capsys: pytest.CaptureFixture[str], text: str, fragment: str) -> None:
    err = parse_error(capsys, f"--member-map={text}")
    assert err.startswith("dvara: error: --member-map: ")
    assert fragment in err


def test_member_map_from_file(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "member-map = a:1=6001, b:2=6002\n")
    assert parse("-c", conf).member_map == ((("a", 1), 6001), (("b", 2), 6002))


def test_ganglia_repeatable_flag() -> None:
    s = parse("--ganglia", "g1:8650", "--ganglia", "G2,g3:1")
    assert s.ganglia == (("g1", 8650), ("g2", 8649), ("g3", 1))


def test_ganglia_in_file_comma_list_or_repeated(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "ganglia = g1:1, g2\nganglia = g3:3\nganglia = [g4:4, g5:5]\n")
    s = parse("-c", conf)
    assert s.ganglia == (("g1", 1), ("g2", 8649), ("g3", 3), ("g4", 4), ("g5", 5))


def test_ganglia_flag_beats_env_and_file(tmp_path: Path) -> None:
    conf = write_conf(tmp_path, "ganglia = file:1\n")
    assert parse("-c", conf, env={"DVARA_GANGLIA": "env:2,env:3"}).ganglia == (("env", 2), ("env", 3))
    assert parse("-c", conf, "--ganglia", "cli:4", env={"DVARA_GANGLIA": "env:2"}).ganglia == (("cli", 4),)


# ---------------------------------------------------------------- helpers


def test_check_port_range() -> None:
    s = parse("--port-start", "6000", "--port-end", "6000")
    check_port_range(s, 1)
    with pytest.raises(ConfigError) as info:
        check_port_range(s, 3)
    assert str(info.value) == (
        "--port-start/--port-end: range 6000-6000 holds 1 port(s) but the replica set has 3 members"
    )
    check_port_range(parse(), 11)
    with pytest.raises(ConfigError):
        check_port_range(parse(), 12)


def test_describe_one_line_per_setting() -> None:
    s = parse("--addrs", "[::1]:1,b:2", "--member-map", "a:1=6001", "--message-timeout", "500ms")
    lines = describe(s).splitlines()
    assert len(lines) == len(dataclasses.fields(Settings))
    assert "addrs = [::1]:1,b:2" in lines
    assert "member-map = a:1=6001" in lines
    assert "message-timeout = 0.5s" in lines
    assert "max-connections = 100" in lines


def test_describe_masks_passwords() -> None:
    @dataclasses.dataclass(frozen=True)
    class WithSecret:
        user: str
        admin_password: str

    text = describe(WithSecret("bob", "hunter2"))  # type: ignore[arg-type]
    assert "hunter2" not in text
    assert "admin-password = ***" in text
    assert "user = bob" in text


# ---------------------------------------------------------------- shipped config files


def test_example_conf_gives_defaults() -> None:
    path = str(CONF_DIR / "dvara.conf")
    assert parse("-c", path) == dataclasses.replace(parse(), config_file=path)


def test_example_conf_mentions_every_option() -> None:
    text = (CONF_DIR / "dvara.conf").read_text()
    for name in OPTION_NAMES:
        assert f"{name} =" in text, name


def test_demo_conf() -> None:
    s = parse("-c", str(CONF_DIR / "demo.conf"))
    assert s.demo is True
    assert (s.demo_port, s.addrs) == (27018, (("127.0.0.1", 27018),))
    assert (s.port_start, s.port_end, s.max_connections, s.log_level) == (6000, 6010, 8, "info")

"""The command line: ``dvara -c FILE`` runs the proxy; ``dvara status`` shows a running one."""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Optional

from dvara_lib.config import Settings, describe, parse_args
from dvara_lib.errors import ConfigError, DiscoveryError, HaltServer

log = logging.getLogger("dvara.app")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(settings: Settings, tag: str = "") -> None:
    """Log to --log-file (or stderr) at --log-level; a worker process tags its lines."""
    handler: logging.Handler
    if settings.log_file:
        handler = logging.FileHandler(settings.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT.replace("%(name)s", "%(name)s" + tag)))
    root = logging.getLogger("dvara")
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    root.propagate = False


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python dvara.py`` and the ``dvara`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "status":
        from dvara_lib.observe.status_cli import main as status_main
        return status_main(argv[1:])
    if argv and argv[0] == "adduser":          # manage the users of --client-auth-file
        from dvara_lib.security.userfile import adduser_main
        return adduser_main(argv[1:])
    settings = parse_args(argv)
    setup_logging(settings)
    log.debug("configuration:\n%s", describe(settings))
    return _run(settings)


def _run(settings: Settings) -> int:
    from dvara_lib.process.server import Server
    demo = None
    try:
        if settings.demo:
            demo = _start_demo(settings)
            settings = dataclasses.replace(settings, addrs=(("127.0.0.1", settings.demo_port),))
        return Server(settings).run()
    except ConfigError as exc:
        print(f"dvara: error: {exc}", file=sys.stderr)
        return 2
    except DiscoveryError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except HaltServer as exc:
        log.error("stopping: %s", exc.reason)
        return exc.exit_status
    finally:
        if demo is not None:
            demo.stop()


def _start_demo(settings: Settings) -> "object":
    from dvara_lib.process.demo import DemoBackend
    demo = DemoBackend(settings.demo_port, settings.demo_data_dir)
    demo.start()
    return demo

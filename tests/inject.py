#!/usr/bin/env python3
"""Run dvara exactly as dvara.py does, with one method made to fail once (tests only).

    DVARA_INJECT=acceptor DVARA_INJECT_FLAG=/path/flag python tests/inject.py --addrs ...

The named method (see TARGETS) raises RuntimeError("injected ...") on its first call
after the flag file appears, so a test can let dvara start and serve, then kill one of
its threads without any test hook in dvara itself. Without DVARA_INJECT this is
dvara.py. When dvara's code moves, re-point TARGETS: nothing else names its internals.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))      # this checkout's dvara_lib, not an installed one

#: fault name -> (module, class, method) that raises. Each method runs in the thread
#: named by the fault, outside any except clause that would swallow the error:
#: - acceptor: called on every pass of Acceptor.run's loop
#: - discovery: called by DiscoveryThread.run between ticks (tick's errors are caught)
TARGETS = {
    "acceptor": ("dvara_lib.proxy.acceptor", "Acceptor", "_housekeeping"),
    "discovery": ("dvara_lib.backend.discovery", "DiscoveryThread", "_until_next_due"),
}
FAULT_ENV = "DVARA_INJECT"
FLAG_ENV = "DVARA_INJECT_FLAG"


def install(fault: str, flag: str) -> None:
    """Make TARGETS[fault] raise once, on its first call after `flag` exists."""
    module_name, class_name, method_name = TARGETS[fault]
    cls = getattr(importlib.import_module(module_name), class_name)
    original = getattr(cls, method_name)
    fired = threading.Event()

    @functools.wraps(original)
    def failing(self, *args, **kwargs):
        if not fired.is_set() and os.path.exists(flag):
            fired.set()
            raise RuntimeError("injected fault")
        return original(self, *args, **kwargs)

    setattr(cls, method_name, failing)
    print(f"inject.py: {fault} fault armed in {class_name}.{method_name} of "
          f"{sys.modules[module_name].__file__}", file=sys.stderr, flush=True)


def main() -> int:
    fault = os.environ.pop(FAULT_ENV, "")      # not passed on to a SIGUSR2 successor
    flag = os.environ.pop(FLAG_ENV, "")
    if fault:
        if fault not in TARGETS or not flag:
            print(f"inject.py: {FAULT_ENV} must be one of {sorted(TARGETS)} and "
                  f"{FLAG_ENV} a path", file=sys.stderr)
            return 2
        install(fault, flag)
    from dvara_lib.process.app import main as dvara_main
    return dvara_main()


if __name__ == "__main__":
    sys.exit(main())

"""Hold N idle pymongo clients on a URI for HOLD seconds (a load process for the tests).

Prints "ready N" once every client has run one ping, then "done" when the hold ends.
"""

from __future__ import annotations

import sys
import time

from pymongo import MongoClient


def main(uri: str, count: int, hold: float) -> int:
    clients = [MongoClient(uri, serverSelectionTimeoutMS=30000, maxPoolSize=1)
               for _ in range(count)]
    for client in clients:
        client.admin.command("ping")
    print(f"ready {count}", flush=True)
    time.sleep(hold)
    for client in clients:
        client.admin.command("ping")
    print("done", flush=True)
    for client in clients:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))

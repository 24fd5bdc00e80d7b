"""Host the rendezvous store of a deployment of separate jobs (`disagg.join`).

    python -m launch.rendezvous --port 29600

Encoder jobs and LLM jobs then join with `rendezvous="tcp://HOST:29600"`. The
store holds only membership (ids, records, leases, pair handshakes); data
never goes through it. If it goes away, pairs already formed keep moving data
and their rooms keep ending as usual; no rank can join and no departure is
collected until it is back (see docs/deployment.md). Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import signal
import threading

from disagg.store import host_store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=29600, help="TCP port of the store")
    p.add_argument("--host", default="0.0.0.0",
                   help="this host's address as the ranks reach it (torch's TCPStore "
                        "listens on every interface whatever this says)")
    args = p.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    store = host_store(args.port, args.host)
    print(f"disagg rendezvous store on tcp://{args.host}:{args.port}", flush=True)
    stop.wait()
    del store
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

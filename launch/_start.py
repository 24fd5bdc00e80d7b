"""What every entry point does first: join the world, or say briefly why not.

A config that does not fit the world (a wrong process count, say) is the same
error on every rank; printed by each, it drowns in per-rank tracebacks. Here it
is printed once, by the node's first rank, in one line, and the process exits
non-zero.
"""

from __future__ import annotations

import os
import sys

import disagg


def init_or_explain(cfg: disagg.DisaggConfig, prog: str) -> disagg.Context | None:
    """`disagg.init(cfg)`, or None after one line on stderr saying what is wrong."""
    try:
        return disagg.init(cfg)
    except (ValueError, disagg.DisaggError) as e:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"{prog}: cannot start: {e}", file=sys.stderr, flush=True)
        return None

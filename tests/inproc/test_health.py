"""In-process layer: `health()` per peer, the readiness probe a serving loop
exposes (DESIGN 0.2): alive, seconds since last heard, live rooms, and the
pair's state, on both sides, before and after a peer is lost."""

from __future__ import annotations

import pytest

from disagg.config import DisaggConfig
from disagg.types import TransferStatus

from .fakes import World
from .rooms import room_data, send

pytestmark = pytest.mark.timeout(60)

EMB, LANG = 0, 1


def test_health_reports_each_peer_and_a_lost_pair_with_its_reason() -> None:
    cfg = DisaggConfig(hidden_size=32, block_size=16, num_blocks=16, bootstrap_timeout=20.0,
                       peer_timeout=4.0)
    with World(cfg) as w:
        s = w.emb().sender(1)
        send(s, room_data(w.cfg, 1, 40))
        r = w.lang().receiver(1, src_rank=EMB)
        w.advance(1.0)  # heartbeats flow both ways
        e_view, l_view = w.emb().health(), w.lang().health()
        assert e_view == {LANG: {"alive": True, "last_heard_s": e_view[LANG]["last_heard_s"],
                                 "rooms_live": 0, "pair": "ok"}}
        assert e_view[LANG]["last_heard_s"] <= 1.0
        assert l_view[EMB]["alive"] and l_view[EMB]["pair"] == "ok"
        assert l_view[EMB]["rooms_live"] == 1  # receiver(1) made, not yet asked
        assert r.init()
        w.deliver_all()
        assert w.emb().health()[LANG]["rooms_live"] == 1
        assert w.finish(r, "room 1") is TransferStatus.SUCCESS
        w.mute(LANG)  # the Language rank falls silent: its links stand
        w.advance(5.0)
        lost = w.emb().health()[LANG]
        assert not lost["alive"] and str(lost["pair"]).startswith("lost: no heartbeat"), lost
        assert float(lost["last_heard_s"]) >= 4.0
        w.close(check=False)  # a muted rank cannot say goodbye

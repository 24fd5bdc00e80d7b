"""The room state machines, cell by cell: the cheapest layer.

For every (state, event) pair of each side's machine, the next state, the
actions (by kind, in order) and the public status, with no thread, socket or
process group: each cell runs in microseconds. The tables below are the
protocol; the module docstrings of `disagg/embedding/machine.py`,
`disagg/embedding/schedule.py` (parts, DEFER, scatter slices),
`disagg/language/machine.py` and `disagg/language/pair.py` (the pair's
stream: owed frames, pre-posted recvs, goodbye) draw the same tables for
readers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disagg.config import DisaggConfig
from disagg.embedding.machine import (
    Grant,
    LaneState,
    SendMachine,
    SendRoom,
    lane_state,
)
from disagg.embedding.machine import (
    set_status as set_send_status,
)
from disagg.embedding.pair import SendPair
from disagg.errors import StreamBroken
from disagg.geometry import Geometry
from disagg.language.actions import Release
from disagg.language.credit import Credit
from disagg.language.machine import Phase, Publish, RecvMachine, RecvRoom, needs_resume, phase
from disagg.language.machine import set_status as set_recv_status
from disagg.language.pair import Next, PairState, RecvPair
from disagg.meta import FLAG_FIRST, FLAG_LAST, FLAG_PADDED, FrameKind, Meta
from disagg.topology import Topology
from disagg.types import TransferStatus

BS, SEQ, LANG, ROOM = 4, 10, 1, 7
CFG = DisaggConfig(hidden_size=8, block_size=BS, num_blocks=16, mrope=False)
GEO = Geometry.from_config(CFG)
W, F, T, S = (TransferStatus.WAITING_FOR_INPUT, TransferStatus.FAILED,
              TransferStatus.TRANSFERRING, TransferStatus.SUCCESS)
B = TransferStatus.BOOTSTRAPPING


def cells(table: dict) -> list[tuple]:
    """Every (state, event) of a table whose event can happen there."""
    return [(st, e) for st, row in table.items() for e, c in row.items() if c is not None]


def room_cell(cell: tuple | str) -> str:
    """A room machine's cell as its docstring shows it: `NEXT: Action, ... (STATUS)`."""
    if isinstance(cell, str):
        return cell
    acts, nxt, status = cell
    return f"{nxt.name}{': ' + ', '.join(acts) if acts else ''} ({status.name})"


def pair_cell(cell: tuple) -> str:
    """A pair machine's cell: `NEXT: what to do`."""
    said, nxt = cell
    return f"{getattr(nxt, 'name', nxt)}{': ' + said if said else ''}"


def table_rows(table: dict, events: list[str], show: Callable, head: str = "state") -> list[str]:
    """A table as the markdown rows its module docstring shows: `show(cell)` per
    cell, `-` where the event cannot happen."""
    rows = [f"| {head} | " + " | ".join(events) + " |", "|---" * (len(events) + 1) + "|"]
    for state, row in table.items():
        shown = ["-" if row[e] is None else show(row[e]) for e in events]
        rows.append(f"| {getattr(state, 'name', state)} | " + " | ".join(shown) + " |")
    return rows


def missing_rows(module: str, rows: list[str]) -> list[str]:
    """The rows a module's docstring lacks (the table a reader sees is the tested one)."""
    import importlib
    doc = importlib.import_module(module).__doc__ or ""
    return [row for row in rows if row not in doc]


# ---------------------------------------------------------------- Embedding


def send_machine() -> SendMachine:
    return SendMachine(0, GEO, Topology(2, 1, 1), bootstrap_timeout=300.0)


def names(actions: list) -> list[str]:
    """Each action's kind; an ABORT frame padded to a pre-posted allocation's
    sizes (DESIGN 0.2) shows as such."""
    return [type(a).__name__ + ("(padded)" if getattr(a, "pad", None) is not None else "")
            for a in actions]


def grant(key: int, blocks: int) -> Grant:
    return Grant(key, tuple(range(blocks)), blocks * BS, False, 0.0)


def data(m: SendMachine, r: SendRoom) -> list:
    return m.data(r, [([torch.zeros(SEQ, 8, dtype=torch.bfloat16)], SEQ)], SEQ, (), None, [0, 1, 2],
                  0.0)


def apply_send(r: SendRoom, actions: list) -> list:
    """What the engine does with `End`: publish the status (the rest is I/O)."""
    for a in actions:
        if type(a).__name__ == "End":
            set_send_status(r, a.status)
    return actions


def send_state(state: LaneState) -> tuple[SendMachine, SendRoom]:
    m, r = send_machine(), SendRoom(ROOM, last_progress=0.0)
    blocks = 3 if state in (LaneState.SENT_LAST, LaneState.DONE) else 1
    apply_send(r, m.alloc(r, LANG, grant(0, blocks), 1, None, lambda lang, first: None))
    if state is LaneState.ABORTING:
        apply_send(r, m.abort(r, "test"))
    elif state is LaneState.CLOSED:
        apply_send(r, m.abort(r, "test"))
        apply_send(r, m.frame_done(r, r.lanes[LANG], data=False, nbytes=0, err=None,
                                   lane_down=None, now=1.0))
    elif state is not LaneState.GRANTED:
        apply_send(r, data(m, r))
    if state in (LaneState.WAIT_RESUME, LaneState.DONE):
        apply_send(r, m.frame_done(r, r.lanes[LANG], data=True, nbytes=1, err=None,
                                   lane_down=None, now=1.0))
    assert lane_state(r, r.lanes[LANG]) is state
    return m, r


def preposted_resume(m: SendMachine, r: SendRoom) -> list:
    """A RESUME whose answer's recvs are posted (wire FLAG_PREPOSTED): direct, and
    saying the tokens they expect (what is due, or one block where nothing is)."""
    key = r.lanes[LANG].sent_tokens
    expect = min(SEQ - key, BS) if key < SEQ else BS
    return m.resume(r, LANG, Grant(key, (0,), BS, True, 0.0, preposted=True, expect=expect),
                    None)


SEND_EVENTS: dict[str, Callable[[SendMachine, SendRoom], list]] = {
    "data": lambda m, r: data(m, r),
    "resume": lambda m, r: m.resume(r, LANG, grant(r.lanes[LANG].sent_tokens, 1), None),
    "resume_preposted": preposted_resume,
    "frame_done": lambda m, r: m.frame_done(r, r.lanes[LANG], data=not r.lanes[LANG].aborting,
                                            nbytes=1, err=None, lane_down=None, now=1.0),
    "send_failed": lambda m, r: m.frame_done(r, r.lanes[LANG], data=True, nbytes=1,
                                             err=RuntimeError("x"), lane_down=None, now=1.0),
    "abort": lambda m, r: m.abort(r, "test"),
    "peer_abort": lambda m, r: m.peer_abort(r, LANG, "test"),
    "peer_lost": lambda m, r: m.peer_lost(r, LANG, "gone"),
    "peer_bye": lambda m, r: m.peer_lost(r, LANG, "it shut down", clean=True),
    "timeout": lambda m, r: m.tick(r, 1000.0),
}

# (state, event) -> (actions by kind, lane state after, room status after); None: the
# event cannot happen in that state (the engine refuses it before the machine).
_ = None
SEND_TABLE: dict[LaneState, dict[str, tuple[list[str], LaneState, TransferStatus] | None]] = {
    LaneState.GRANTED: {
        "data": (["SendData"], LaneState.SENDING, T),
        "resume": ([], LaneState.GRANTED, W),  # key 0 again: a repeat
        # key 0 again: a repeat, ignored (a genuine rank never repeats one)
        "resume_preposted": ([], LaneState.GRANTED, W),
        "frame_done": _, "send_failed": _,
        "abort": (["CountFailure", "SendAbortFrame"], LaneState.ABORTING, W),
        "peer_abort": (["CountFailure", "SendAbortFrame"], LaneState.ABORTING, W),
        "peer_lost": (["CountFailure", "SendReject", "End"], LaneState.CLOSED, F),
        "peer_bye": (["CountFailure", "SendReject", "End"], LaneState.CLOSED, F),
        # no data within bootstrap_timeout: the grant is answered, the room fails
        "timeout": (["CountFailure", "SendAbortFrame"], LaneState.ABORTING, W),
    },
    LaneState.SENDING: {
        "data": _,
        "resume": (["Count", "SendData"], LaneState.SENDING, T),  # eager: next chunk queued
        # an eager resume whose recvs are posted: its chunk is the exact size posted
        "resume_preposted": (["Count", "Preposted", "SendData"], LaneState.SENDING, T),
        "frame_done": (["Count"], LaneState.WAIT_RESUME, T),
        "send_failed": (["CountFailure", "SendReject", "End"], LaneState.CLOSED, F),
        # the chunk on the wire decides when the room ends; the reason goes by REJECT
        "abort": (["CountFailure", "SendReject"], LaneState.SENDING, T),
        "peer_abort": (["CountFailure", "SendReject"], LaneState.SENDING, T),
        # a peer declared dead ends the room at once; the frame is the transport's
        "peer_lost": (["CountFailure", "SendReject", "End"], LaneState.CLOSED, F),
        "peer_bye": (["CountFailure", "SendReject"], LaneState.SENDING, T),
        "timeout": ([], LaneState.SENDING, T),
    },
    LaneState.WAIT_RESUME: {
        "data": _,
        "resume": (["Count", "SendData"], LaneState.SENDING, T),
        "resume_preposted": (["Count", "Preposted", "SendData"], LaneState.SENDING, T),
        "frame_done": _, "send_failed": _,
        "abort": (["CountFailure", "SendReject", "End"], LaneState.CLOSED, F),
        "peer_abort": (["CountFailure", "SendReject", "End"], LaneState.CLOSED, F),
        "peer_lost": (["CountFailure", "SendReject", "End"], LaneState.CLOSED, F),
        "peer_bye": (["CountFailure", "SendReject", "End"], LaneState.CLOSED, F),
        "timeout": (["CountFailure", "SendReject", "End"], LaneState.CLOSED, F),
    },
    LaneState.SENT_LAST: {
        "data": _,
        # a RESUME after every token was sent is refused; the last chunk on the
        # wire still decides the room (DESIGN, "Outcomes agree")
        "resume": (["SendAbortFrame"], LaneState.SENT_LAST, T),
        # refused, padded to the sizes the rank says it posted (issue 23)
        "resume_preposted": (["SendAbortFrame(padded)"], LaneState.SENT_LAST, T),
        "frame_done": (["Count", "End"], LaneState.DONE, S),
        "send_failed": (["CountFailure", "SendReject", "End"], LaneState.CLOSED, F),
        # the last chunk is on the wire: its completion decides, whoever aborts
        "abort": ([], LaneState.SENT_LAST, T),
        "peer_abort": ([], LaneState.SENT_LAST, T),
        # declared dead: the room ends now (a frozen peer that wakes learns
        # PAIR_DOWN); after a clean goodbye the send's completion decides
        "peer_lost": (["CountFailure", "SendReject", "End"], LaneState.CLOSED, F),
        "peer_bye": ([], LaneState.SENT_LAST, T),
        "timeout": ([], LaneState.SENT_LAST, T),
    },
    LaneState.DONE: {
        "data": _,
        "resume": (["SendAbortFrame"], LaneState.DONE, S),  # refused: the room ended
        "resume_preposted": (["SendAbortFrame(padded)"], LaneState.DONE, S),
        "frame_done": _, "send_failed": _,
        "abort": ([], LaneState.DONE, S), "peer_abort": ([], LaneState.DONE, S),
        "peer_lost": ([], LaneState.DONE, S), "peer_bye": ([], LaneState.DONE, S),
        "timeout": ([], LaneState.DONE, S),
    },
    LaneState.ABORTING: {
        "data": _,
        "resume": (["SendAbortFrame"], LaneState.ABORTING, W),  # refused: the room failed
        "resume_preposted": (["SendAbortFrame(padded)"], LaneState.ABORTING, W),
        "frame_done": (["End"], LaneState.CLOSED, F),
        "send_failed": _,
        "abort": ([], LaneState.ABORTING, W), "peer_abort": ([], LaneState.ABORTING, W),
        "peer_lost": (["End"], LaneState.CLOSED, F), "peer_bye": ([], LaneState.ABORTING, W),
        "timeout": ([], LaneState.ABORTING, W),
    },
    LaneState.CLOSED: {
        "data": _, "frame_done": _, "send_failed": _,
        "resume": (["SendAbortFrame"], LaneState.CLOSED, F),
        "resume_preposted": (["SendAbortFrame(padded)"], LaneState.CLOSED, F),
        "abort": ([], LaneState.CLOSED, F), "peer_abort": ([], LaneState.CLOSED, F),
        "peer_lost": ([], LaneState.CLOSED, F), "peer_bye": ([], LaneState.CLOSED, F),
        "timeout": ([], LaneState.CLOSED, F),
    },
}


SEND_CELLS = cells(SEND_TABLE)


# ---------------------------------------------------------------- the Embedding side: parts

# A room given in parts (progressive send), pre-posted grants meeting a part
# (DEFER), parts that coalesce into one chunk, and a scatter lane whose slice
# is empty. Rows are named for how the lane got there; SEQ tokens, blocks of BS.

def _emb(m: SendMachine, r: SendRoom, n: int) -> list[torch.Tensor]:
    return [torch.zeros(n, 8, dtype=torch.bfloat16)]


def give(m: SendMachine, r: SendRoom, n: int, seq_len: int = SEQ) -> list:
    """The caller gives the next `n` tokens (its first send(), or a later part)."""
    if r.sources is None:
        return m.data(r, [(_emb(m, r, n), n)], seq_len, (), None, [0, 1, 2], 0.0)
    return m.part(r, [(_emb(m, r, n), n)], None, 0.0)


def parts_state(row: str) -> tuple[SendMachine, SendRoom]:
    m, r = send_machine(), SendRoom(ROOM, last_progress=0.0)
    if row == "SCATTER_EMPTY_SLICE":  # TP 2, rank 1's slice of a 1-token room is empty
        m = SendMachine(0, GEO, Topology(3, 1, 2), bootstrap_timeout=300.0)
        for lang in (1, 2):
            g = Grant(0, (0,), BS, False, 0.0, scatter=True)
            apply_send(r, m.alloc(r, lang, g, 2, None, lambda lang, first: None))
        return m, r
    blocks = 2 if row == "FIRST_GRANT" else 1
    apply_send(r, m.alloc(r, LANG, grant(0, blocks), 1, None, lambda lang, first: None))
    if row == "FIRST_GRANT":
        return m, r
    apply_send(r, give(m, r, BS))  # the first part, one block: sent at once
    apply_send(r, m.frame_done(r, r.lanes[LANG], data=True, nbytes=1, err=None,
                               lane_down=None, now=1.0))
    if row == "PARTS_GIVEN":  # two more parts, no grant: nothing leaves
        assert apply_send(r, give(m, r, 3)) == [] and apply_send(r, give(m, r, 3)) == []
    elif row == "WAITS_FOR_PART":  # a RESUME whose tokens are not given yet waits
        assert names(apply_send(r, m.resume(r, LANG, grant(BS, 1), None))) == ["Count"]
    elif row == "PREPOSTED_WAITS":
        g = Grant(BS, (0,), BS, True, 0.0, preposted=True, expect=BS)
        apply_send(r, m.resume(r, LANG, g, None))
    return m, r


def _lane(r: SendRoom) -> int:
    return 2 if 2 in r.lanes else LANG


def part_names(actions: list) -> list[str]:
    """`names`, with each DATA frame's tokens and, when it spans several, its parts."""
    out = []
    for a in actions:
        n = type(a).__name__
        if n == "SendData":
            k = len(a.parts)
            n += f"[{a.meta.num_tokens}{f', {k} parts' if k > 1 else ''}]"
        out.append(n)
    return out


def _resume(m: SendMachine, r: SendRoom, preposted: bool) -> list:
    lane = r.lanes[_lane(r)]
    key = lane.sent_tokens
    if not preposted:
        return m.resume(r, _lane(r), grant(key, 2), None)
    return m.resume(r, _lane(r), Grant(key, (0, 1), 2 * BS, True, 0.0, preposted=True,
                                       expect=min(SEQ - key, 2 * BS)), None)


PARTS_EVENTS: dict[str, Callable[[SendMachine, SendRoom], list]] = {
    "part(2)": lambda m, r: give(m, r, 2),
    "part(rest)": lambda m, r: (give(m, r, 1, seq_len=1) if 2 in r.lanes
                                else give(m, r, SEQ - r.given)),
    "resume": lambda m, r: _resume(m, r, preposted=False),
    "resume_preposted": lambda m, r: _resume(m, r, preposted=True),
}
PARTS_TABLE: dict[str, dict[str, tuple[list[str], LaneState, TransferStatus] | None]] = {
    # an ALLOC of 2 blocks waits for data: a first part that is smaller leaves
    # at once (the rest follows a resume), the whole room fills the grant
    "FIRST_GRANT": {
        "part(2)": (["SendData[2]"], LaneState.SENDING, T),
        "part(rest)": (["SendData[8]"], LaneState.SENDING, T),
        "resume": None, "resume_preposted": None,
    },
    # the first part was sent; a RESUME came before the next part: the grant
    # takes what the next part gives, up to its size
    "WAITS_FOR_PART": {
        "part(2)": (["SendData[2]"], LaneState.SENDING, T),
        "part(rest)": (["SendData[4]"], LaneState.SENDING, T),
        "resume": ([], LaneState.GRANTED, T),  # a repeat of its key: ignored
        "resume_preposted": ([], LaneState.GRANTED, T),
    },
    # the same RESUME, its recvs posted for a whole block: a part that gives
    # less is DEFERred (filler), and an ordinary chunk leaves at once
    "PREPOSTED_WAITS": {
        "part(2)": (["SendDefer", "SendData[2]"], LaneState.SENDING, T),
        "part(rest)": (["SendData[4]"], LaneState.SENDING, T),
        "resume": ([], LaneState.GRANTED, T), "resume_preposted": ([], LaneState.GRANTED, T),
    },
    # two parts were given while no grant waited: one chunk spans both (the
    # rest of the room, so its last)
    "PARTS_GIVEN": {
        "part(2)": None, "part(rest)": None,
        "resume": (["Count", "SendData[6, 2 parts]"], LaneState.SENT_LAST, T),
        "resume_preposted": (["Count", "Preposted", "SendData[6, 2 parts]"],
                             LaneState.SENT_LAST, T),
    },
    # fanout="scatter", a 1-token room to a TP-2 instance: TP rank 0 gets its
    # token, TP rank 1 (the lane shown) a meta frame alone (it carries seq_len),
    # the last of its lane
    "SCATTER_EMPTY_SLICE": {
        "part(2)": None,
        "part(rest)": (["SendData[1]", "SendData[0]"], LaneState.SENT_LAST, T),
        "resume": None, "resume_preposted": None,
    },
}
PARTS_CELLS = cells(PARTS_TABLE)


def render_parts() -> list[str]:
    """The parts table as `disagg/embedding/schedule.py`'s docstring shows it."""
    return table_rows(PARTS_TABLE, list(PARTS_EVENTS), room_cell, head="lane")


def test_schedule_docstring_shows_the_tested_parts_table() -> None:
    missing = missing_rows("disagg.embedding.schedule", render_parts())
    assert not missing, "docstring out of date; these rows are missing:\n" + "\n".join(missing)


@pytest.mark.parametrize(("row", "event"), PARTS_CELLS, ids=[f"{s}-{e}" for s, e in PARTS_CELLS])
def test_parts_cell(row: str, event: str) -> None:
    m, r = parts_state(row)
    actions = apply_send(r, PARTS_EVENTS[event](m, r))
    assert (part_names(actions), lane_state(r, r.lanes[_lane(r)]), r.status) == \
        PARTS_TABLE[row][event]


def test_send_table_covers_every_cell() -> None:
    assert set(SEND_TABLE) == set(LaneState)
    assert all(set(row) == set(SEND_EVENTS) for row in SEND_TABLE.values())


@pytest.mark.parametrize(("state", "event"), SEND_CELLS,
                         ids=[f"{s.value}-{e}" for s, e in SEND_CELLS])
def test_send_cell(state: LaneState, event: str) -> None:
    m, r = send_state(state)
    expected = SEND_TABLE[state][event]
    assert expected is not None
    actions = apply_send(r, SEND_EVENTS[event](m, r))
    assert (names(actions), lane_state(r, r.lanes[LANG]), r.status) == expected


def test_send_status_never_moves_backwards_or_out_of_an_end() -> None:
    r = SendRoom(ROOM, last_progress=0.0)
    set_send_status(r, T)
    with pytest.raises(AssertionError):
        set_send_status(r, W)
    r.failure = "x"
    set_send_status(r, F)
    with pytest.raises(AssertionError):
        set_send_status(r, S)


def test_send_budget_returned_once_whatever_ends_the_room() -> None:
    """Exactly one End per room, on every path through the table."""
    for state, event in SEND_CELLS:
        m, r = send_state(state)
        ends = sum(type(a).__name__ == "End" for a in SEND_EVENTS[event](m, r))
        assert ends <= 1
        assert not (ends and state in (LaneState.DONE, LaneState.CLOSED)), (state, event)


# ---------------------------------------------------------------- Language


def recv_machine() -> RecvMachine:
    return RecvMachine(LANG, 1, auto_resume=False, bootstrap_timeout=300.0, peer_timeout=10.0)


def meta_for(r: RecvRoom, c: Credit) -> Meta:
    n = min(SEQ - c.key, c.allocated_tokens)
    flags = (FLAG_FIRST if c.key == 0 else 0) | (FLAG_LAST if c.key + n == SEQ else 0)
    return Meta(FrameKind.DATA, ROOM, r.chunk_index, c.key, n, SEQ, flags, ())


def apply_recv(r: RecvRoom, actions: list) -> list:
    for a in actions:
        if isinstance(a, Publish):
            set_recv_status(r, a.status)
    return actions


def deliver_meta(m: RecvMachine, r: RecvRoom) -> list:
    meta = meta_for(r, r.outstanding) if r.outstanding else Meta(FrameKind.DATA, ROOM, 0, 0,
                                                                  SEQ, SEQ, 3, ())
    a = m.owed(r, 0, meta)
    chunk = m.check_meta(r, a, meta)
    return m.landing(r, a, meta, chunk)


def recv_state(ph: Phase) -> tuple[RecvMachine, RecvRoom]:
    m, r = recv_machine(), RecvRoom(ROOM, 0, created=0.0, last_progress=0.0)
    if ph is Phase.FAILED:
        apply_recv(r, m.abort(r, "test"))
    if ph in (Phase.NEW, Phase.FAILED):
        assert phase(r) is ph
        return m, r
    blocks = 3 if ph is Phase.DONE else 1
    apply_recv(r, m.asked(r, Credit(0, list(range(blocks)), blocks * BS, False), 0.0,
                          auto=False))
    if ph is Phase.DRAINING:
        apply_recv(r, m.abort(r, "test"))
    if ph in (Phase.LANDING, Phase.PARTIAL, Phase.RESUMED, Phase.DONE):
        apply_recv(r, deliver_meta(m, r))
    if ph in (Phase.PARTIAL, Phase.RESUMED, Phase.DONE):
        apply_recv(r, m.landed(r, None, 1.0))
    if ph is Phase.RESUMED:
        apply_recv(r, m.resumed(r, Credit(r.received, [], SEQ - r.received, True)))
    assert phase(r) is ph
    return m, r


def _landed(m: RecvMachine, r: RecvRoom) -> list:
    if r.landing is None:
        raise LookupError("nothing landing")
    return m.landed(r, None, 2.0)


def _abort_frame(m: RecvMachine, r: RecvRoom) -> list:
    m.owed(r, 0, Meta(FrameKind.ABORT, ROOM))
    return m.abort_frame(r, "peer said so", 0)


RECV_EVENTS: dict[str, Callable[[RecvMachine, RecvRoom], list]] = {
    "meta": deliver_meta,
    "landed": _landed,
    "abort_frame": _abort_frame,
    "reject": lambda m, r: m.reject(r, 0, "no"),
    "abort": lambda m, r: m.abort(r, "test"),
    "peer_lost": lambda m, r: m.peer_lost(r, "gone", release_landing=False),
    "peer_bye": lambda m, r: m.peer_lost(r, "it shut down", release_landing=False, clean=True),
    "timeout": lambda m, r: m.tick(r, 1000.0),
}

SB = "StreamBroken"  # the pair is torn down: every room on it fails
RECV_TABLE: dict[Phase, dict[str, tuple[list[str], Phase, TransferStatus] | str | None]] = {
    Phase.NEW: {
        "meta": SB, "landed": _, "abort_frame": SB,
        "reject": (["CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
        "abort": (["CountFailure", "Untrack", "Publish", "Post"], Phase.FAILED, F),
        "peer_lost": (["CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
        "peer_bye": (["CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
        "timeout": (["CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
    },
    Phase.ASKED: {
        "meta": ([], Phase.LANDING, W), "landed": _,
        "abort_frame": (["Release", "CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
        "reject": (["CountFailure", "Publish"], Phase.DRAINING, F),
        "abort": (["CountFailure", "Publish", "Post"], Phase.DRAINING, F),
        "peer_lost": (["Release", "CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
        "peer_bye": (["Release", "CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
        "timeout": (["CountFailure", "Publish", "Post"], Phase.DRAINING, F),
    },
    Phase.LANDING: {
        "meta": SB,
        "landed": (["Release"], Phase.PARTIAL, T),
        "abort_frame": SB,
        "reject": (["CountFailure", "Publish"], Phase.DRAINING, F),
        "abort": (["CountFailure", "Publish", "Post"], Phase.DRAINING, F),
        # fails now; the blocks under the landing payload stay held until its recv ends
        "peer_lost": (["CountFailure", "Publish"], Phase.DRAINING, F),
        # a goodbye after this chunk was sent: its landing decides
        "peer_bye": ([], Phase.LANDING, W),
        "timeout": ([], Phase.LANDING, W),
    },
    Phase.PARTIAL: {
        "meta": SB, "landed": _, "abort_frame": SB,
        "reject": (["CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
        "abort": (["CountFailure", "Untrack", "Publish", "Post"], Phase.FAILED, F),
        "peer_lost": (["CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
        "peer_bye": (["CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
        "timeout": (["CountFailure", "Untrack", "Publish", "Post"], Phase.FAILED, F),
    },
    Phase.RESUMED: {
        "meta": ([], Phase.LANDING, T), "landed": _,
        "abort_frame": (["Release", "CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
        "reject": (["CountFailure", "Publish"], Phase.DRAINING, F),
        "abort": (["CountFailure", "Publish", "Post"], Phase.DRAINING, F),
        "peer_lost": (["Release", "CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
        "peer_bye": (["Release", "CountFailure", "Untrack", "Publish"], Phase.FAILED, F),
        "timeout": (["CountFailure", "Publish", "Post"], Phase.DRAINING, F),
    },
    Phase.DRAINING: {
        "meta": ([], Phase.DRAINING, F), "landed": _,
        "abort_frame": (["Release", "Untrack"], Phase.FAILED, F),
        "reject": ([], Phase.DRAINING, F), "abort": ([], Phase.DRAINING, F),
        "peer_lost": (["Release", "Untrack"], Phase.FAILED, F),
        "peer_bye": (["Release", "Untrack"], Phase.FAILED, F),
        "timeout": ([], Phase.DRAINING, F),
    },
    Phase.DONE: {
        "meta": SB, "landed": _, "abort_frame": SB,
        "reject": ([], Phase.DONE, S), "abort": ([], Phase.DONE, S),
        "peer_lost": ([], Phase.DONE, S), "timeout": ([], Phase.DONE, S),
        "peer_bye": ([], Phase.DONE, S),
    },
    Phase.FAILED: {
        "meta": SB, "landed": _, "abort_frame": SB,
        "reject": ([], Phase.FAILED, F), "abort": ([], Phase.FAILED, F),
        "peer_lost": ([], Phase.FAILED, F), "timeout": ([], Phase.FAILED, F),
        "peer_bye": ([], Phase.FAILED, F),
    },
}

RECV_CELLS = cells(RECV_TABLE)


def test_recv_table_covers_every_cell() -> None:
    assert set(RECV_TABLE) == set(Phase)
    assert all(set(row) == set(RECV_EVENTS) for row in RECV_TABLE.values())


@pytest.mark.parametrize(("ph", "event"), RECV_CELLS,
                         ids=[f"{p.value}-{e}" for p, e in RECV_CELLS])
def test_recv_cell(ph: Phase, event: str) -> None:
    m, r = recv_state(ph)
    expected = RECV_TABLE[ph][event]
    if expected == SB:
        with pytest.raises(StreamBroken):
            RECV_EVENTS[event](m, r)
        return
    actions = apply_recv(r, RECV_EVENTS[event](m, r))
    assert (names(actions), phase(r), r.status) == expected


def test_needs_resume_is_exactly_partial() -> None:
    for ph in Phase:
        _, r = recv_state(ph)
        assert needs_resume(r) == (ph is Phase.PARTIAL), ph


@pytest.mark.parametrize("ph", list(Phase), ids=[p.value for p in Phase])
def test_blocks_are_released_only_by_a_frame_or_a_lost_pair(ph: Phase) -> None:
    """A room that fails keeps its allocation (DRAINING) until a frame answers it.
    Read from the machine itself, every event in every phase: only an answering
    frame or the pair's loss releases blocks; a released allocation is no longer
    the room's, and one not released still is (nothing is dropped unreleased).
    The receiver thread's own view of a lost pair (`release_landing`) included."""
    events = {**RECV_EVENTS,
              "peer_lost_seen_by_its_thread":
                  lambda m, r: m.peer_lost(r, "gone", release_landing=True)}
    for event, fn in events.items():
        m, r = recv_state(ph)
        held = [c for c in (r.outstanding, r.landing) if c is not None]
        try:
            actions = fn(m, r)
        except (StreamBroken, LookupError, AssertionError):
            continue  # the event cannot happen here (the table's "-" or StreamBroken)
        released = [a.credit for a in actions if isinstance(a, Release)]
        if released:
            assert event in ("landed", "abort_frame", "peer_lost", "peer_bye",
                             "peer_lost_seen_by_its_thread"), (ph, event)
        for c in released:
            assert c is not r.outstanding and c is not r.landing, (ph, event)
        for c in held:
            assert any(c is x for x in released) or c is r.outstanding or c is r.landing, \
                (ph, event, "an allocation dropped without being released")


def test_recv_status_is_monotone_and_final() -> None:
    r = RecvRoom(ROOM, 0, created=0.0, last_progress=0.0)
    set_recv_status(r, W)
    with pytest.raises(AssertionError):
        set_recv_status(r, B)
    set_recv_status(r, S)
    r.failure = "late"
    with pytest.raises(AssertionError):
        set_recv_status(r, F)


# ---------------------------------------------------------------- the tables in the docs


def render(table: dict, events: list[str]) -> list[str]:
    """A room machine's table as the markdown rows its module docstring shows."""
    return table_rows(table, events, room_cell)


@pytest.mark.parametrize(("module", "table", "events"), [
    ("disagg.embedding.machine", SEND_TABLE, list(SEND_EVENTS)),
    ("disagg.language.machine", RECV_TABLE, list(RECV_EVENTS)),
], ids=["embedding", "language"])
def test_module_docstring_shows_the_tested_table(module: str, table: dict,
                                                 events: list[str]) -> None:
    """The table a reader sees is the table these tests check, row for row."""
    missing = missing_rows(module, render(table, events))
    assert not missing, "docstring out of date; these rows are missing:\n" + "\n".join(missing)


# ---------------------------------------------------------------- the Embedding side's pair

def _pre(key: int = 0) -> Grant:
    return Grant(key, (0,), BS, False, 0.0, preposted=True, expect=BS)


def send_pair(state: str) -> tuple[SendPair, Grant | None]:
    """The Embedding side's pair machine in `state`, and the grant that waits."""
    p, g = SendPair(), None
    if state != "NOTHING_WAITS":
        g = _pre()
        p.posted(ROOM, g)
        if state == "WAITS_DEFERRED":  # deferred meanwhile by a partial progressive part
            g.preposted = False
    return p, g


def _pair_said(out: tuple[int, Grant] | None) -> str:
    return "" if out is None else "DEFER it"


SEND_PAIR_EVENTS: dict[str, Callable[[SendPair], str]] = {
    "posted": lambda p: p.posted(ROOM + 1, _pre()) or "",
    "frame(same room)": lambda p: _pair_said(p.before_frame(ROOM)),
    "frame(other room)": lambda p: _pair_said(p.before_frame(ROOM + 2)),
    "lost": lambda p: p.lost() or "",
}
# (what the event's caller must do, the state after); None: cannot happen (a
# rank pre-posts only when nothing else is owed on the pair, so a second
# pre-posted grant never arrives while one waits)
SEND_PAIR_TABLE: dict[str, dict[str, tuple[str, str] | None]] = {
    "NOTHING_WAITS": {"posted": ("", "WAITS"), "frame(same room)": ("", "NOTHING_WAITS"),
                      "frame(other room)": ("", "NOTHING_WAITS"), "lost": ("", "NOTHING_WAITS")},
    # its own room's frame is its answer (or follows it); another room's must
    # not take its recvs: it is DEFERred first, once
    "WAITS": {"posted": None, "frame(same room)": ("", "NOTHING_WAITS"),
              "frame(other room)": ("DEFER it", "NOTHING_WAITS"),
              "lost": ("", "NOTHING_WAITS")},
    "WAITS_DEFERRED": {"posted": None, "frame(same room)": ("", "NOTHING_WAITS"),
                       "frame(other room)": ("", "NOTHING_WAITS"),
                       "lost": ("", "NOTHING_WAITS")},
}
SEND_PAIR_CELLS = cells(SEND_PAIR_TABLE)


def _send_pair_state(p: SendPair) -> str:
    if p.waiting is None:
        return "NOTHING_WAITS"
    return "WAITS" if p.waiting[1].preposted else "WAITS_DEFERRED"


@pytest.mark.parametrize(("state", "event"), SEND_PAIR_CELLS,
                         ids=[f"{s}-{e}" for s, e in SEND_PAIR_CELLS])
def test_send_pair_cell(state: str, event: str) -> None:
    """`embedding.pair.SendPair`, every cell: a DEFER only for another room's
    frame while a pre-posted answer that was not deferred yet waits."""
    p, g = send_pair(state)
    said = SEND_PAIR_EVENTS[event](p)
    assert (said, _send_pair_state(p)) == SEND_PAIR_TABLE[state][event]
    if said:
        assert g is not None and not g.preposted  # the DEFER transition, once


def test_send_pair_docstring_shows_the_tested_table() -> None:
    rows = table_rows(SEND_PAIR_TABLE, list(SEND_PAIR_EVENTS), pair_cell)
    missing = missing_rows("disagg.embedding.pair", rows)
    assert not missing, "docstring out of date; these rows are missing:\n" + "\n".join(missing)


# ---------------------------------------------------------------- the Language side's pair


def _pair(state: PairState) -> RecvPair:
    """A Language pair machine in `state`, reached by its own events."""
    p = RecvPair()
    credit = Credit(0, [0], BS, False)
    if state is PairState.LOST:
        p.lose("the peer died")
    elif state is PairState.OWED:
        p.expect()
    elif state is PairState.META_AHEAD:
        p.expect()
        p.expect()
        assert p.next_post(meta_if_owed=True) is Next.META
    elif state in (PairState.HANDED, PairState.PREPOSTED):
        assert p.can_prepost(closing=False)
        p.parked = state is PairState.HANDED  # a parked thread: its caller posts
        p.expect()
        p.handed(credit)
    elif state is PairState.DRAINING:
        p.expect()
        assert p.bye(1)
    assert p.state is state, (p.state, state)
    return p


def _frame(p: RecvPair) -> str:
    """A frame's meta was read and answered one owed allocation."""
    p.frame_read(preposted=p.credit is not None)
    p.answered()
    return "last" if p.last_read() else ""


def _caller_posted(p: RecvPair) -> str:
    assert p.claim() and not p.claim()  # one poster
    p.caller_posted(True)
    return "wake"


PAIR_EVENTS: dict[str, Callable[[RecvPair], str]] = {
    "expect": lambda p: "wake" if p.expect() else "",
    "disown": lambda p: p.disown() or "",
    "handed(parked)": lambda p: (setattr(p, "parked", True),
                                 "caller posts" if p.handed(Credit(0, [0], BS, False))
                                 else "wake")[1],
    "handed(busy)": lambda p: "caller posts" if p.handed(Credit(0, [0], BS, False)) else "wake",
    "caller_posted": _caller_posted,
    "caller_gone": lambda p: p.caller_gone() or "",
    "frame": _frame,
    "bye": lambda p: "drain" if p.bye(p.frames_read + p.owed) else "lost now",
    "lose": lambda p: "first" if p.lose("gone") else "",
    "next_post": lambda p: p.next_post(meta_if_owed=True).value,
}

# the next state and what the event's caller must do; None: cannot happen there
# (`handed` comes only right after the `expect` that owes its frame, on a pair
# with nothing else owed, and a `disown` only before it; a frame is read only
# while one is owed)
IDLE_, OWED_, AHEAD_, HANDED_, PRE_, DRAIN_, LOST_ = PairState
PAIR_TABLE: dict[PairState, dict[str, tuple[str, PairState] | None]] = {
    IDLE_: {"expect": ("wake", OWED_), "disown": None, "handed(parked)": None,
            "handed(busy)": None, "caller_posted": None, "caller_gone": None, "frame": None,
            "bye": ("lost now", IDLE_), "lose": ("first", LOST_),
            "next_post": ("nothing", IDLE_)},
    OWED_: {"expect": ("wake", OWED_), "disown": ("", IDLE_),
            "handed(parked)": ("caller posts", HANDED_), "handed(busy)": ("wake", PRE_),
            "caller_posted": None, "caller_gone": None, "frame": ("", IDLE_),
            "bye": ("drain", DRAIN_), "lose": ("first", LOST_),
            "next_post": ("post meta", AHEAD_)},
    AHEAD_: {"expect": ("wake", AHEAD_), "disown": ("", AHEAD_), "handed(parked)": None,
             "handed(busy)": None, "caller_posted": None, "caller_gone": None,
             "frame": ("", OWED_), "bye": ("drain", DRAIN_), "lose": ("first", LOST_),
             "next_post": ("post meta", AHEAD_)},
    HANDED_: {"expect": ("", HANDED_), "disown": None, "handed(parked)": None,
              "handed(busy)": None, "caller_posted": ("wake", PRE_),
              "caller_gone": ("", PRE_), "frame": None, "bye": ("drain", DRAIN_),
              "lose": ("first", LOST_), "next_post": ("wait for the caller", HANDED_)},
    PRE_: {"expect": ("wake", PRE_), "disown": None, "handed(parked)": None,
           "handed(busy)": None, "caller_posted": None, "caller_gone": ("", PRE_),
           "frame": ("", IDLE_), "bye": ("drain", DRAIN_), "lose": ("first", LOST_),
           "next_post": ("post job", PRE_)},
    DRAIN_: {"expect": ("wake", DRAIN_), "disown": ("", DRAIN_), "handed(parked)": None,
             "handed(busy)": None, "caller_posted": None, "caller_gone": None,
             "frame": ("last", DRAIN_), "bye": ("drain", DRAIN_), "lose": ("first", LOST_),
             "next_post": ("post meta", DRAIN_)},
    LOST_: {"expect": None, "disown": None, "handed(parked)": None, "handed(busy)": None,
            "caller_posted": None, "caller_gone": None, "frame": None,
            "bye": ("lost now", LOST_), "lose": ("", LOST_), "next_post": ("nothing", LOST_)},
}
PAIR_CELLS = cells(PAIR_TABLE)


def test_pair_table_covers_every_cell() -> None:
    assert set(PAIR_TABLE) == set(PairState)
    assert all(list(row) == list(PAIR_EVENTS) for row in PAIR_TABLE.values())


@pytest.mark.parametrize(("state", "event"), PAIR_CELLS,
                         ids=[f"{s.name}-{e}" for s, e in PAIR_CELLS])
def test_pair_cell(state: PairState, event: str) -> None:
    p = _pair(state)
    said = PAIR_EVENTS[event](p)
    assert (said, p.state) == PAIR_TABLE[state][event]


def test_pair_docstring_shows_the_tested_table() -> None:
    rows = table_rows(PAIR_TABLE, list(PAIR_EVENTS), pair_cell)
    missing = missing_rows("disagg.language.pair", rows)
    assert not missing, "docstring out of date; these rows are missing:\n" + "\n".join(missing)


def test_pair_owed_counts_every_frame_once_and_a_job_is_posted_once() -> None:
    """Owed frames: one per ALLOC/RESUME sent, none for one not sent, one less
    per frame read; a handed-over frame's recvs are posted by exactly one of
    the caller and the thread, and only the poster's side marks its credit."""
    p = RecvPair()
    p.expect()
    p.expect()
    p.disown()
    assert p.owed == 1
    _frame(p)
    assert p.owed == 0 and p.state is PairState.IDLE
    p.parked = True
    c = Credit(0, [0], BS, False)
    assert p.can_prepost(closing=False) and not p.can_prepost(closing=True)
    p.expect()
    assert p.handed(c) and c.posted  # the caller posts: the thread frees its blocks
    assert not p.can_prepost(closing=False)
    assert p.claim() and not p.claim()
    p.caller_posted(False)  # its post failed: the thread tries, and finds the pair broken
    assert p.next_post() is Next.JOB and p.next_post() is Next.POSTED
    busy = RecvPair()
    busy.expect()
    c2 = Credit(0, [0], BS, False)
    assert not busy.handed(c2) and not c2.posted  # nothing posted into it yet
    assert busy.next_post() is Next.JOB and c2.posted
    assert not busy.claim()  # never the caller's


def test_pair_goodbye_reads_what_was_sent_then_ends() -> None:
    p = RecvPair()
    p.expect()
    p.expect()
    assert p.bye(2) and not p.last_read()
    _frame(p)
    assert not p.last_read() and p.next_post(meta_if_owed=True) is Next.META
    _frame(p)
    assert p.last_read() and p.next_post(meta_if_owed=True) is Next.NOTHING
    assert not RecvPair().bye(0)  # nothing left to read: it ends now


def test_pair_says_what_answered_a_preposted_frame() -> None:
    """DATA; a padded ABORT; a padded DEFER (nothing posted into its blocks any
    more); anything else, or another room's frame, breaks the stream."""
    c = Credit(0, [0], BS, False, posted=True)
    assert RecvPair.answer_ahead(Meta(FrameKind.DATA, ROOM), ROOM, c, 1) is FrameKind.DATA
    padded = FLAG_PADDED
    assert RecvPair.answer_ahead(Meta(FrameKind.ABORT, ROOM, flags=padded), ROOM, c,
                                 1) is FrameKind.ABORT and c.posted
    assert RecvPair.answer_ahead(Meta(FrameKind.DEFER, ROOM, flags=padded), ROOM, c,
                                 1) is FrameKind.DEFER and not c.posted
    for bad in (Meta(FrameKind.ABORT, ROOM), Meta(FrameKind.DEFER, ROOM + 1, flags=padded),
                Meta(FrameKind.CLOSE, ROOM, flags=padded)):
        with pytest.raises(StreamBroken):
            RecvPair.answer_ahead(bad, ROOM, c, 1)

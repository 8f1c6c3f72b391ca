"""How the quota scripts' calls travel: charge.lua and adjust.lua calls encoded as RESP, their
replies decoded into results.

Every request sends a charge.lua call, so its encoding is memoised at three levels: the call's
head per key count, each ``Charge``'s key and arguments by the object's identity (the stage
reuses one ``Charge`` per limit and key while its cost is unchanged), the arguments per limit
*shape* (shared by every key of a limit: a new account's charge only encodes its key), and a
whole call per charges tuple the stage reuses. The bytes are exactly what hiredis packs (a test
compares them). Settles reuse the charges' memoised pieces for adjust.lua.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from redis.crc import key_slot

from gateway.memo import make_room
from gateway.store.base import (
    Adjustment,
    Algorithm,
    Charge,
    ChargeResult,
    LimitState,
    Receipt,
    new_named,
    state_from_ms,
)
from gateway.store.resp import pack

# Bound on the memo of encoded charges (one per charge object the stage keeps: rule × limit × key
# values seen recently); when full the oldest eighth goes (gateway.memo).
WIRE_MEMO_ENTRIES = 16384
# Bound on the memo of whole charge.lua calls by charges tuple. Kept small: with per-request token
# costs every request brings a new tuple, and a miss only costs joining the memoised pieces.
WHOLE_MEMO_ENTRIES = 4096
# charge.lua's first argument: compact replies when every charge applied, or full (each charge's
# state as if not applied too: what a refund across Cluster slots needs)
_COMPACT = pack("c")[4:]
_FULL = pack("f")[4:]

# One charge encoded: (charge, key, charge.lua arguments, adjust.lua arguments before delta and
# reference, hash slot in a Cluster (0 otherwise)); the tuple pins the charge, so its id is not
# reused while the entry lives.
Wire = tuple[Charge, bytes, bytes, bytes, int]


# A request's charges split by Cluster slot: (slot, indices into the charges) per slot, each
# slot's charges, and each slot's charge.lua call (compact replies for one slot, full for several:
# a denial in one slot needs the others' states as if not applied).
SlotCalls = tuple[list[tuple[int, list[int]]], list[Sequence[Charge]], list[bytes]]


def evalsha_head(sha: str, count: int, parts: int) -> bytes:
    """RESP array header, command, SHA and key count of an EVALSHA of ``parts`` parts in all,
    the keys and arguments to be appended already encoded."""
    whole = pack("EVALSHA", sha, count)
    return b"*%d\r\n" % parts + whole[whole.index(b"\r\n") + 2:]


class ScriptCodec:
    """Encodes the quota scripts' calls for one store (key prefix, script SHAs) and decodes
    charge.lua's replies; holds the memo tables (one per store, one event loop)."""

    def __init__(self, prefix: str, charge_sha: str, adjust_sha: str, cluster: bool) -> None:
        self._prefix = prefix
        self._charge_sha = charge_sha
        self._adjust_sha = adjust_sha
        self._cluster = cluster  # slots are worked out only where they matter
        self._heads: dict[int, bytes] = {}  # charge.lua call heads per key count
        self._adjust_heads: dict[int, bytes] = {}
        self._wire: dict[int, Wire] = {}  # id(charge) → its encoding
        # (algorithm, limit, period, cost, burst or bucket, shadow) → (charge.lua arguments,
        # adjust.lua arguments)
        self._shapes: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}
        self._packed: dict[int, tuple[Sequence[Charge], bytes]] = {}  # id(charges tuple) → call
        self._slot_calls: dict[int, tuple[Sequence[Charge], SlotCalls]] = {}  # likewise, in a Cluster

    def charge_args(self, charges: Sequence[Charge], reply: str = "f") -> tuple[list[str], list[str | int]]:
        """Keys and arguments of charge.lua; ``reply`` "f" (full, what a cross-slot denial needs:
        the idle states) or "c" (compact when every charge applied)."""
        args: list[str | int] = [reply]
        for c in charges:
            param = c.burst if c.algorithm is Algorithm.GCRA else c.bucket_ms
            args += [c.algorithm, c.limit, c.period_ms, c.cost, param, int(c.shadow), c.lease_id]
        prefix = self._prefix
        return [f"{prefix}{{{c.key}}}" for c in charges], args

    def pack_charge(self, charges: Sequence[Charge], full: bool = False) -> bytes:
        """The EVALSHA of charge.lua for ``charges``, as RESP (compact replies). A charge's key
        and arguments encode the same way every time, and the stage reuses one ``Charge`` per
        limit and key while its cost is unchanged (always, for request rates), so their encoding
        is memoised per charge object; a tuple of charges the stage reuses whole (a plan of
        request rates, or unchanged costs) is memoised as the whole command."""
        whole = None if full else self._packed.get(id(charges))
        if whole is not None and whole[0] is charges:
            return whole[1]
        count = len(charges)
        parts = [self.charge_head(count)]
        tails: list[bytes] = [_FULL if full else _COMPACT]
        memo = self._wire
        for c in charges:
            wire = memo.get(id(c))
            if wire is None or wire[0] is not c:
                wire = self.encode_charge(c)
            parts.append(wire[1])
            tails.append(wire[2])
        parts += tails
        packed = b"".join(parts)
        if type(charges) is tuple and not full:
            packs = self._packed
            make_room(packs, WHOLE_MEMO_ENTRIES)
            packs[id(charges)] = (charges, packed)  # pins the tuple: its id is not reused meanwhile
        return packed

    def slot_calls(self, charges: Sequence[Charge]) -> SlotCalls:
        """``charges`` split by slot, with each slot's call (memoised per reused tuple, as
        :meth:`pack_charge` is)."""
        memo = self._slot_calls.get(id(charges))
        if memo is not None and memo[0] is charges:
            return memo[1]
        wires = [self.wire_of(c) for c in charges]
        by_slot: dict[int, list[int]] = {}
        for i, wire in enumerate(wires):
            by_slot.setdefault(wire[4], []).append(i)
        groups = list(by_slot.items())
        if len(groups) == 1:
            calls: SlotCalls = (groups, [charges], [self.pack_charge(charges)])
        else:
            subs: list[Sequence[Charge]] = [[charges[i] for i in g] for _, g in groups]
            calls = (groups, subs, [self.pack_charge(sub, full=True) for sub in subs])
        if type(charges) is tuple:
            make_room(self._slot_calls, WHOLE_MEMO_ENTRIES)
            self._slot_calls[id(charges)] = (charges, calls)  # pins the tuple, as in pack_charge
        return calls

    def charge_head(self, count: int) -> bytes:
        """Array header, command, SHA and key count of a charge.lua call with ``count`` keys."""
        head = self._heads.get(count)
        if head is None:  # the array: 3 + the reply flag + 8 per charge (key + 7 arguments)
            head = self._heads[count] = evalsha_head(self._charge_sha, count, 4 + 8 * count)
        return head

    def encode_charge(self, c: Charge) -> Wire:
        """Encode one charge (its limit's shape from the shape memo) and remember it."""
        param = c.burst if c.algorithm is Algorithm.GCRA else c.bucket_ms
        # hiredis packs each part as a bulk string; drop the array headers ("*7\r\n", "*4\r\n")
        shape = (c.algorithm, c.limit, c.period_ms, c.cost, param, c.shadow)
        encoded = None if c.lease_id else self._shapes.get(shape)  # a lease id is per request
        if encoded is None:
            encoded = (pack(c.algorithm, c.limit, c.period_ms, c.cost, param, int(c.shadow), c.lease_id)[4:],
                       pack(c.algorithm, c.limit, c.period_ms, c.bucket_ms)[4:])
            if not c.lease_id:
                make_room(self._shapes, WIRE_MEMO_ENTRIES)
                self._shapes[shape] = encoded
        args, adjust = encoded
        name = f"{self._prefix}{{{c.key}}}".encode()
        key = b"$%d\r\n%b\r\n" % (len(name), name)  # a RESP bulk string, as hiredis packs it
        memo = self._wire
        make_room(memo, WIRE_MEMO_ENTRIES)
        # the entry pins c, so its id is not reused meanwhile; the slot matters in a Cluster only
        wire = memo[id(c)] = (c, key, args, adjust, key_slot(name) if self._cluster else 0)
        return wire

    def wire_of(self, c: Charge) -> Wire:
        """The memoised encoding of one charge: (charge, key, charge.lua arguments, adjust.lua
        arguments, slot)."""
        wire = self._wire.get(id(c))
        if wire is None or wire[0] is not c:
            wire = self.encode_charge(c)
        return wire

    @staticmethod
    def charge_result(charges: Sequence[Charge], raw: Any) -> ChargeResult:
        """Parse charge.lua's reply (RESP integers: both hiredis and redis-py's own parser give
        Python ints). Compact (2, when every charge applied): now_ms, then remaining, reset_ms and
        bucket_ms per charge. Full: allowed, now_ms, then 7 integers per charge."""
        if raw[0] == 2:  # the usual case; charge.lua never returns negatives here
            states: list[LimitState] = []
            receipts: list[Receipt] = []
            at = 2
            for c in charges:
                states.append(new_named(LimitState, (True, c.limit, raw[at], raw[at + 1] / 1000.0, 0.0)))
                receipts.append(new_named(Receipt, (c, raw[at + 2], True)))
                at += 3
            return new_named(ChargeResult, (True, raw[1] / 1000.0, tuple(states), tuple(receipts)))
        allowed = raw[0] == 1
        states, receipts, at = [], [], 2
        for c in charges:
            if raw[at] == 1:  # ok: the state as charged (as state_from_ms builds it, inlined)
                reset = max(0, raw[at + 2]) / 1000.0
                states.append(new_named(LimitState, (True, c.limit, max(0, raw[at + 1]), reset, 0.0)))
                receipts.append(new_named(Receipt, (c, raw[at + 4], allowed)))
            else:
                states.append(state_from_ms(False, c.limit, raw[at + 1], raw[at + 2], raw[at + 3]))
                receipts.append(new_named(Receipt, (c, raw[at + 4], False)))
            at += 7
        return new_named(ChargeResult, (allowed, raw[1] / 1000.0, tuple(states), tuple(receipts)))

    @staticmethod
    def group_result(charges: Sequence[Charge], raw: Any) -> tuple[ChargeResult, tuple[LimitState, ...]]:
        """A full charge.lua reply as the result and the states as if not applied."""
        idle = tuple(state_from_ms(bool(raw[2 + 7 * i]), c.limit, int(raw[7 + 7 * i]), int(raw[8 + 7 * i]),
                                   int(raw[5 + 7 * i])) for i, c in enumerate(charges))
        return ScriptCodec.charge_result(charges, raw), idle

    @staticmethod
    def merge_admitted(count: int, groups: list[tuple[int, list[int]]], subs: list[Sequence[Charge]],
                       replies: list[Any]) -> ChargeResult:
        """One result from the full replies of slots that all admitted: no refund, so the
        states as if not applied are never needed."""
        states: list[Any] = [None] * count
        receipts: list[Any] = [None] * count
        now = math.inf
        for (_, indices), sub, raw in zip(groups, subs, replies, strict=True):
            part = ScriptCodec.charge_result(sub, raw)
            now = min(now, part.now)
            for i, state, receipt in zip(indices, part.states, part.receipts, strict=True):
                states[i] = state
                receipts[i] = receipt
        return new_named(ChargeResult, (True, now, tuple(states), tuple(receipts)))

    def pack_adjust(self, adjustments: Sequence[Adjustment]) -> bytes:
        """The EVALSHA of adjust.lua for ``adjustments``, as RESP: each charge's key and fixed
        arguments come from the encoding memo (the charges settled are the ones charged), only
        the delta and the reference are encoded here."""
        count = len(adjustments)
        head = self._adjust_heads.get(count)
        if head is None:  # the array: 3 + 7 per adjustment (key + 6 arguments)
            head = self._adjust_heads[count] = evalsha_head(self._adjust_sha, count, 3 + 7 * count)
        parts = [head]
        tails: list[bytes] = []
        memo = self._wire
        for a in adjustments:
            receipt = a.receipt
            c = receipt.charge
            wire = memo.get(id(c))
            if wire is None or wire[0] is not c:
                wire = self.encode_charge(c)
            parts.append(wire[1])
            delta = b"%d" % a.delta
            ref = c.lease_id.encode() if c.algorithm is Algorithm.LEASE else b"%d" % receipt.bucket_ms
            tails.append(b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n" % (wire[3], len(delta), delta, len(ref), ref))
        parts += tails
        return b"".join(parts)

    def adjust_args(self, adjustments: Sequence[Adjustment]) -> tuple[list[str], list[str | int]]:
        """Keys and arguments of adjust.lua (the unmemoised form: redis-py's path)."""
        args: list[str | int] = []
        for a in adjustments:
            c = a.receipt.charge
            ref = c.lease_id if c.algorithm is Algorithm.LEASE else str(a.receipt.bucket_ms)
            args += [c.algorithm, c.limit, c.period_ms, c.bucket_ms, a.delta, ref]
        prefix = self._prefix
        return [f"{prefix}{{{a.receipt.charge.key}}}" for a in adjustments], args

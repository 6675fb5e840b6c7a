"""Continuous batching: a language model's copy runs iterations (steps), as vLLM does.

Each step gives every running sequence one token (decode) and spends what is left of the token
budget (``max_num_batched_tokens``) on prompts (prefill): first the prompts already in prefill,
then waiting ones, admitted in arrival order while ``max_num_seqs`` and the KV cache allow. A prompt
longer than the budget prefills in chunks over several steps; the step that completes it gives the
request its first token. A sequence holds ``ceil(tokens in its cache / block_size)`` blocks of the
copy's KV cache; when a running sequence needs a block and none is free, the most recently admitted
sequence is preempted: its blocks are freed and it waits at the head of the queue, to prefill its
prompt and the tokens it had generated again (recompute). The time of a step is the model's
:class:`~sim.hosting.steps.StepTime` of its composition.

No event per token. While no prompt is in prefill and none can be admitted, the batch is decode
only and its composition does not change until a sequence finishes or the cache runs out; the engine
computes that step in closed form and schedules one event at its end. An arrival meanwhile, with room
for another sequence, moves that event to the end of the step in progress: it joins at the next step
boundary. The step that starts there is composed at once (until then nothing on the device changes
but further starts, which join it as its composition there would have admitted them), so the boundary
costs no event of its own. Steps that prefill are one event each (a prompt takes ``ceil(tokens /
budget)`` of them), but for the usual one: a step composed ahead that prefills the whole prompt of the
one sequence that cut the run, where none finishes at its end and the next step's blocks fit, has its end
done at once too (the sequence's first token, the decode run that follows and its end's event); a start
or a stop before that end takes it back, and the end is an event again. Results are the same either way
(tests compare them); only the engine log's rows come in another order, as they already may.

A step costs about the same whatever the batch: the running sequences' state is kept against a decode
clock (the steps run so far), with their context in all, a heap of when each finishes and, per step
modulo the block size, how many take a new KV block at such a step. A request costs about two calendar
entries (its arrival, taken from the request table, and the end of the run it finishes): the end of the
decode run that its arrival cut moves in place on a small calendar, else is voided (:meth:`_move`); a
device makes its entries once and reuses them as they come up (a voided one too).

``busy`` counts the requests handed to the device (running, in prefill and waiting). The endpoint's
log gets every change of the running and waiting sequences and of the KV blocks used, as deltas
``(t, running, waiting, blocks used, blocks)`` (:attr:`EndpointLog.llm`: five numbers a row in one flat
list, which makes no object per row), a row or a few at each instant any changed, and the preemptions.
A step composed ahead logs its changes at its start, so the rows are not in time order: a reader sorts
them (stably) by time. A change taken back (a step composed ahead, or its end done at once, that a start
or a stop takes back) has its row's deltas zeroed where it stands (the engine keeps rows' positions).
"""
from __future__ import annotations

from collections import deque
from heapq import heapify, heappop, heappush, heapreplace
from itertools import count
from math import nan, sqrt

from simpy.core import NORMAL

from ..core.engine import NO_CAPACITY, Call
from .device import Device, DeviceSet, Done  # noqa: F401 (DeviceSet: types)


class _Seq:
    """A sequence on the device: its request, the tokens its next prefill computes (``prompt``; its
    prompt, and after a preemption the tokens it had generated too), the tokens in its KV cache
    (``ctx``), the output tokens still to come (``left``) and its blocks.

    While it decodes (running), these are kept against the device's decode clock ``D`` (the steps run so
    far) instead: its cache holds ``base + D`` tokens in ``ceil((base + D) / block_size)`` blocks, and it
    finishes when the clock reaches ``fin``; ``key`` names its entry in the device's heap of finishes
    (-1 once it stops running, preempted or taken back: that entry is then stale; every entry has a key
    of its own, so a finished sequence's key matches none left). A running sequence's ``ctx`` and
    ``left`` are not kept up to date (a prefill's figures)."""

    __slots__ = ("i", "prompt", "ctx", "left", "blocks", "admitted", "base", "fin", "key")

    def __init__(self, i: int, prompt: int, left: int):
        self.i = i
        self.prompt = prompt
        self.ctx = 0
        self.left = left
        self.blocks = 0
        self.admitted = False
        # base, fin and key are set as it starts to decode


_new = object.__new__
# a start's log row after its time: one more sequence waiting (ContinuousBatching.start)
_WAITS = (0, 1, 0, 0)
# the calendar's size up to which a moved end replaces its entry in place (ContinuousBatching._move)
MOVE_IN_PLACE = 16


class ContinuousBatching(Device):
    """Iteration-level scheduling of one language model's copy (see the module's doc).

    The decoding sequences' state is kept incrementally, so that a step costs about the same whatever the
    batch's size: their context in all (``_sum`` + n D), a heap of when each finishes, and per residue of
    the decode clock modulo the block size the sequences that take a new KV block at such a step
    (``_cnt``: a sequence whose cache holds a multiple of ``block_size`` tokens needs a block for its
    next token)."""

    # whether a prefill step composed ahead may have its end done at once (_cut_run); off, every
    # step's end is an event (the same results: tests compare the two)
    prefill_ahead = True

    __slots__ = ("_step_time", "_bs", "_free", "_blocks", "_max_seqs", "_budget", "_waiting", "_prefill",
                 "_running", "_pending", "_run", "_chunks", "_log", "_llm", "_cbs", "_firing", "_dw", "_D",
                 "_sum", "_cnt", "_heap", "_keys", "_tin", "_tout", "_nopen", "_first", "_startc", "_svc", "_one",
                 "_ov", "_spares", "_ahead", "_ahead_open", "_undo", "_p", "_queue", "_eid", "_maxtok",
                 "_dcol", "_t1", "_eager", "_engine", "_eager_ok", "_void", "_entry", "_refuse_cbs")

    def __init__(self, devices: DeviceSet, index: int, done: Done, cfg):
        super().__init__(devices, index, done)
        self._step_time = cfg.step
        self._bs = cfg.block_size
        self._blocks = cfg.kv_blocks
        self._free = cfg.kv_blocks
        self._max_seqs = cfg.max_num_seqs
        self._budget = cfg.max_num_batched_tokens
        self._waiting: deque[_Seq] = deque()
        self._prefill: list[_Seq] = []       # admitted, prompt not yet all in the cache (admission order)
        # decoding, in admission order (a dict: O(1) removal; popitem() gives the most recently admitted)
        self._running: dict[_Seq, None] = {}
        self._pending: Call | None = None    # the end of the step (or run of decode steps) in progress
        # a decode run: (start, steps, a1, s): a one-term step model's steps take a1 + s j seconds (step j
        # of the run), else a1 is the run's Envelope and s = 0.0
        self._run: tuple | None = None
        self._chunks: tuple | list = ()      # the prefill chunks (sequence, tokens) of the step in progress
        self._p = 0                          # their tokens in all
        self._log = devices.log
        self._llm = devices.log.llm
        self._cbs = [self._end_step]
        self._refuse_cbs = [self._refuse]
        self._firing = False                 # in _end_step: a start there waits for its next step
        self._dw = 0                         # sequences queued meanwhile, not yet in the log
        self._D = 0                          # decode clock: steps run so far
        self._sum = 0                        # sum of the running sequences' ``base``
        self._cnt = [0] * self._bs           # running sequences by (-base) mod block_size
        self._heap: list[tuple[int, int, _Seq]] = []   # (fin, key, sequence); stale when key differs
        self._keys = count(1)
        r = self._r
        self._tin, self._tout = r.open_tokens()
        self._nopen = r.n_open
        self._first = r.track_first_token()   # (nan: no first token yet)
        self._startc = r.start
        self._svc = r.service
        self._dcol = r.device
        self._maxtok = self._blocks * self._bs   # a sequence of more tokens never fits the cache
        env = self._env
        self._queue = env._queue             # the calendar (Environment.schedule inlined below)
        self._eid = env._eid
        self._one = cfg.step._one   # the one term (a, b, c, d) of a one-term step model, else None
        self._ov = cfg.step.overhead
        self._spares: list[Call] = []        # entries that came up, for the next steps to reuse
        # an entry voided (its step's end moved) only hands itself back for reuse when it comes up
        self._void = [self._spares.append]
        # a step composed ahead (_cut_run): when it starts, whether a start before then joins it, and what
        # a stop before then takes back: (its log rows' positions, its preemptions, the waiting's starts)
        self._ahead = -1.0
        self._ahead_open = False
        self._undo: tuple | None = None
        # a prefill step composed ahead whose end is done already (_cut_run): when it ends, and
        # what taking it back needs
        self._t1 = -1.0
        self._eager: tuple | None = None
        self._engine = devices.engine
        self._eager_ok = self.prefill_ahead
        self._llm.extend((self._env._now, 0, 0, 0, self._blocks))

    def _seqs(self) -> int:
        return len(self._running) + len(self._prefill)

    # -- the device interface (once per request: keep lean) -----------------------------------------------
    def start(self, i: int, now: float) -> None:
        self._dcol[i] = self.index
        if i < self._nopen:
            tin = self._tin[i]
            tout = self._tout[i]
        else:
            tin, tout = self._r.tokens(i)
        if tin < 1:
            tin = 1
        if tout < 1:
            tout = 1
        if tin + tout > self._maxtok:   # more blocks than the cache has: ceil(tokens / block_size) > blocks
            # longer than the whole cache holds (vLLM refuses a prompt beyond max_model_len): refused at this
            # instant as an event of its own, so that the endpoint's done() does not run inside its start()
            # (an mme instance could unload the model there while it starts that model's next request)
            self.busy += 1
            heappush(self._queue, (now, NORMAL, next(self._eid), Call(self._refuse_cbs, i)))
            return
        self.busy += 1
        seq = _new(_Seq)   # _Seq(i, tin, tout), without the call to __init__
        seq.i = i
        seq.prompt = tin
        seq.ctx = 0
        seq.left = tout
        seq.blocks = 0
        seq.admitted = False
        self._waiting.append(seq)
        if self._firing:
            self._dw += 1
            return
        if self._pending is None:
            self._step(now, 0, 1, 0, True)
            return
        llm = self._llm   # its row: one more waiting (the time, then the constant deltas: no tuple made)
        llm.append(now)
        llm.extend(_WAITS)
        if now < self._t1:   # the prefill step composed ahead ends after this start: an event again
            self._undo_prefill_ahead()
        if now < self._ahead:   # the next step is composed already: it admits this one if it would have
            if self._ahead_open:
                self._join_ahead(seq)
        elif self._run is not None and len(self._running) + len(self._prefill) < self._max_seqs:
            self._cut_run(now)

    def _refuse(self, call: Call) -> None:
        """A request longer than the whole cache (:meth:`start`) ends, as no capacity."""
        if self.dead:   # (the instance failed meanwhile: its failure took the request)
            return
        self.busy -= 1
        i = call.arg
        self.done(i, self)
        self._r.status[i] = NO_CAPACITY

    def stop(self) -> None:
        if self._env._now < self._t1:
            self._undo_prefill_ahead()
        super().stop()
        if self._pending is not None:
            self._pending.callbacks = []
            self._pending = None
        # the cache and the queue go with the instance
        now = self._env._now
        dr, dw, du = -len(self._running) - len(self._prefill), -len(self._waiting), -(self._blocks - self._free)
        if now < self._ahead:   # take back the step composed ahead: its rows in the log, at its start
            rows, pre, starts = self._undo
            llm = self._llm
            for k in rows:   # (their positions: each zeroed, its time kept)
                dr, dw, du = dr + llm[k + 1], dw + llm[k + 2], du + llm[k + 3]
                llm[k + 1:k + 4] = (0, 0, 0)
            times = self._log.preempted
            for _ in range(pre):
                k = len(times) - 1 - times[::-1].index(self._ahead)
                del times[k]
            for i, t in starts:
                self._startc[i] = t
        if dr or dw or du:
            self._llm.extend((now, dr, dw, du, 0))
        self._llm.extend((now, 0, 0, 0, -self._blocks))

    # -- steps --------------------------------------------------------------------------------------------
    def _schedule(self, at: float) -> None:
        spares = self._spares
        if spares:
            call = spares.pop()
            call.callbacks = self._cbs
        else:
            call = Call(self._cbs)
        self._pending = call
        e = self._entry = (at, NORMAL, next(self._eid), call)
        heappush(self._queue, e)

    def _move(self, at: float) -> None:
        """The pending end moves to ``at``. On a small calendar its entry is replaced in place, so that
        no voided entry is left to come up; on a larger one (where rebuilding the heap would cost more
        than that) it is voided and a new one scheduled. The new entry takes the next sequence number
        either way: the events come in the same order."""
        q = self._queue
        n = len(q)
        if n <= MOVE_IN_PLACE:
            k = q.index(self._entry)   # (by identity first: entries differ in time or sequence number)
            e = self._entry = (at, NORMAL, next(self._eid), self._pending)
            if k == 0:
                heapreplace(q, e)
            elif k == n - 1:   # a leaf: the heap holds without it
                q.pop()
                heappush(q, e)
            else:
                q[k] = e
                heapify(q)
        else:
            self._pending.callbacks = self._void
            self._schedule(at)

    def _cut_run(self, now: float) -> None:
        """An arrival during a decode run: the run ends with the step in progress."""
        t0, m, a1, s = self._run
        span = now - t0
        if self._one is None:   # a1: the run's envelope (StepTime.decode_steps_within, decode_time)
            j = a1.steps_within(span, m)
            if j + 1 >= m:
                return   # the run's last step is the one in progress
            end = t0 + a1.time(j + 1)
        else:
            # steps.one_term_steps_within(a1, s, span, m), written out: j steps take j a1 + s j (j - 1) / 2
            # seconds (StepTime.decode_time of one term); ``tn``, that sum for j + 1 steps, gives the step's end
            # (the same floats: tests/test_continuous_batching.py compares the engine with a reference that
            # runs one step at a time; the root ``g`` is only a first guess, which the sums checked below
            # correct, so it squares by a product rather than ``** 2``)
            if a1 > span:   # one step takes a1
                j = 0
                tn = a1
            else:
                if s > 0.0:
                    half = s / 2.0
                    g = ((half - a1) + sqrt((a1 - half) * (a1 - half) + 2.0 * s * span)) / s
                elif a1 > 0.0:
                    g = span / a1
                else:
                    g = m
                j = m if not (g < m) else (int(g) if g >= 1.0 else 1)   # also nan/inf: m
                if j < m:
                    tn = (j + 1) * a1 + s * (j + 1) * j / 2.0
                    if tn <= span:
                        j += 1
                        while j < m:
                            tn = (j + 1) * a1 + s * (j + 1) * j / 2.0
                            if tn > span:
                                break
                            j += 1
                    else:
                        while j > 1:
                            t = j * a1 + s * j * (j - 1) / 2.0
                            if t <= span:
                                break
                            tn = t
                            j -= 1
                else:
                    while j > 1 and j * a1 + s * j * (j - 1) / 2.0 > span:
                        j -= 1
                    tn = (j + 1) * a1 + s * (j + 1) * j / 2.0
            if j + 1 >= m:
                return   # the run's last step is the one in progress
            end = t0 + tn
        # The pending end moves: the paths below put the new end in its place in the calendar (_move), or
        # void it before _step schedules the next.
        # Compose the next step now, at its start ``end``: until then nothing on the device changes but
        # starts, which join it where its composition then would have admitted them (_join_ahead).
        running = self._running
        bs = self._bs
        cnt = self._cnt
        D = self._D
        du = 0
        if j:   # the blocks of the run's later steps, by the clock D + 1 .. D + j (_allocs, inlined)
            rem = j
            if j >= bs:
                du = j // bs * len(running)
                rem = j % bs
            if rem:
                a = (D + 1) % bs
                e = a + rem
                du += sum(cnt[a:e]) if e <= bs else sum(cnt[a:]) + sum(cnt[:e - bs])
            self._free -= du
        D = self._D = D + j + 1   # no sequence finishes: j + 1 < m
        self._run = None
        waiting = self._waiting
        llm = self._llm
        if not self._prefill and len(waiting) == 1:
            # The usual case: the one start that cut the run is the only sequence waiting, none in
            # prefill. Its step is what _step composes then (the running sequences' blocks for their
            # next token, then its first chunk), written out: the same figures, without the general
            # case's loops and records.
            free = self._free
            more = cnt[D % bs]
            n = len(running)
            budget = self._budget - n
            q = waiting[0]
            c = q.prompt
            if c > budget:
                c = budget
            need = -(-c // bs)
            if more + need <= free and budget > 0:
                # (the start checked max_num_seqs: n < max_num_seqs)
                waiting.popleft()
                free -= more + need
                q.blocks = need
                du += more + need
                i = q.i
                startc = self._startc
                old = startc[i]
                if not q.admitted:   # its wait ends at its first admission
                    q.admitted = True
                    startc[i] = end
                self._free = free
                row0 = len(llm)   # (its position in the log)
                llm.extend((end, 1, -1, du, 0))
                k = self._sum + n * D
                one = self._one
                if one is None:
                    at = end + self._step_time.time(n, k, c)
                else:   # StepTime.time, inlined
                    a, b, c_, d = one
                    at = end + (self._ov + (a + b * n + c_ * k + d * c))
                self._ahead = end
                if c == q.prompt and q.left > 1 and at < self._engine.horizon and self._eager_ok:
                    heap = self._heap
                    top = heap[0]
                    while top[2].key != top[1]:   # (stale entries: _decode drops them too)
                        heappop(heap)
                        top = heap[0]
                    # none finishes at its end, and the next step's blocks fit: its end is known now
                    D1 = D + 1
                    top0 = top[0]
                    # the blocks of the next step: the running sequences' and q's (q takes one for its
                    # next token where its cache of c tokens is full: c % bs == 0)
                    more = cnt[D1 % bs] + (c % bs == 0)
                    if top0 > D1 and more <= free:
                        # Its end is known now: done at once (_end_step's work at ``at``, written out
                        # for this case), with no event at ``at``. A start or a stop before ``at`` takes
                        # it back (_undo_prefill_ahead): the step's end is then an event again. (``q``
                        # leaves the prefill and the step's chunks as soon as it enters them; its ``ctx``
                        # and ``left``, a prefill's, stay as they were: a running sequence has ``base``
                        # and ``fin`` instead.)
                        self._D = D1
                        first = self._first
                        own_first = first[i] != first[i]   # (nan: none yet)
                        if own_first:
                            first[i] = at
                        base = q.base = c - D1
                        key = q.key = next(self._keys)
                        fin = q.fin = D1 + q.left - 1
                        running[q] = None
                        heappush(heap, (fin, key, q))
                        k = self._sum = self._sum + base
                        cnt[-base % bs] += 1   # (now more == cnt[D1 % bs])
                        row = -1
                        if more:
                            free -= more
                            self._free = free
                            row = len(llm)
                            llm.extend((at, 0, 0, more, 0))
                        self._t1 = at
                        # what taking it back needs, and then the step composed ahead's _undo (its row's
                        # position, the start's admission) and _ahead_open: _undo_prefill_ahead sets them
                        self._eager = (q, c, more, row, own_first, row0, old)
                        # the decode run from ``at`` (_decode, written out: the heap's top is ``top`` or q)
                        n += 1
                        m = (top0 if top0 <= fin else fin) - D1
                        if m > 1 and n * (-(-(m - 1) // bs)) > free:
                            m = self._steps_in_cache(m, free)
                        k += n * D1
                        if one is None:
                            ev = self._step_time.envelope(n, float(k), m)
                            self._run = (at, m, ev, 0.0)
                            t = at + ev.time(m)
                        else:
                            a1 = self._ov + (a + b * n + c_ * k)
                            s = c_ * n
                            self._run = (at, m, a1, s)
                            t = at + (m * a1 + s * m * (m - 1) / 2.0)
                        self._move(t)
                        return
                self._undo = ([row0], 0, [(i, old)])
                self._ahead_open = budget - c > 0 and n + 1 < self._max_seqs
                self._prefill.append(q)
                self._chunks = [(q, c)]
                self._p = c
                self._move(at)
                return
        times = self._log.preempted
        rows, pre = len(llm), len(times)
        startc = self._startc
        if len(waiting) == 1:   # the usual case: the start that cut the run
            q = waiting[0]
            starts = [(q.i, startc[q.i])]
        else:
            starts = [(q.i, startc[q.i]) for q in waiting]
        self._pending.callbacks = self._void   # void it: _step schedules the next end
        self._step(end, 0, 0, du, du != 0)
        self._undo = (list(range(rows, len(llm), 5)), len(times) - pre, starts)
        self._ahead = end
        self._ahead_open = (not waiting and self._run is None
                            and self._budget - len(running) - self._p > 0
                            and len(running) + len(self._prefill) < self._max_seqs)

    def _undo_prefill_ahead(self) -> None:
        """Take back a prefill step's end done at once (:meth:`_cut_run`): the prefill step composed ahead ends at ``_t1`` again,
        an event."""
        t1 = self._t1
        self._t1 = -1.0
        q, c, more, row, own_first, row0, old = self._eager
        self._eager = None
        self._run = None
        if row >= 0:   # its blocks' row, zeroed
            self._free += more
            self._llm[row + 3] = 0
        self._D -= 1
        running = self._running
        del running[q]
        q.key = -1
        base = q.base
        self._sum -= base
        self._cnt[-base % self._bs] -= 1
        self._prefill.append(q)   # (its ctx and left, a prefill's, were left as they were)
        if own_first:
            self._first[q.i] = nan
        self._chunks = [(q, c)]
        self._p = c
        # the step composed ahead, as _cut_run leaves one that it does not end at once
        n = len(running)
        self._undo = ([row0], 0, [(q.i, old)])
        self._ahead_open = self._budget - n - c > 0 and n + 1 < self._max_seqs
        self._move(t1)   # (the decode run's end moves back to the step's)

    def _join_ahead(self, s: _Seq) -> None:
        """A start before the step composed ahead begins: that step admits ``s`` if the cache has room
        (the budget and max_num_seqs do: ``_ahead_open``), as its composition at its start would have,
        the waiting admitted in order; else none after it either."""
        running = self._running
        chunks = self._chunks
        n = len(running)
        p = self._p
        budget = self._budget - n - p
        c = s.prompt if s.prompt < budget else budget
        more = -(-c // self._bs)
        if more > self._free:
            self._ahead_open = False
            return
        at = self._ahead
        self._waiting.pop()
        self._free -= more
        s.blocks = more
        self._prefill.append(s)
        s.admitted = True
        self._startc[s.i] = at
        chunks.append((s, c))
        p += c
        self._p = p
        llm = self._llm
        self._undo[0].append(len(llm))
        llm.extend((at, 1, -1, more, 0))
        self._ahead_open = budget - c > 0 and n + len(self._prefill) < self._max_seqs
        k = self._sum + n * self._D + sum(q.ctx for q, _ in chunks)
        one = self._one
        if one is None:
            self._move(at + self._step_time.time(n, k, p))
        else:   # StepTime.time, inlined
            a, b, c_, d = one
            self._move(at + (self._ov + (a + b * n + c_ * k + d * p)))

    def _allocs(self, first: int, steps: int) -> int:
        """The KV blocks the running sequences take over the decode steps ``first .. first + steps - 1``
        (by the clock): each takes one at the steps where its cache holds a multiple of block_size."""
        bs = self._bs
        q, rem = divmod(steps, bs)
        total = q * len(self._running)
        if rem:
            cnt = self._cnt
            a = first % bs
            e = a + rem
            total += sum(cnt[a:e]) if e <= bs else sum(cnt[a:]) + sum(cnt[:e - bs])
        return total

    def _step(self, now: float, dr: int, dw: int, du: int, hit: bool) -> None:
        """Compose the next step at ``now`` and schedule its end (nothing when the device is idle); ``dr,
        dw, du``: the changes of running and waiting sequences and blocks used since the last log row;
        ``hit``: whether any changed at ``now`` (a log row then, even where they cancel out: the log has a
        row at each instant something changed)."""
        running = self._running
        prefill = self._prefill
        bs = self._bs
        free = self._free
        D = self._D
        n = len(running)
        if n:
            # every decoding sequence writes one token this step: blocks for it, preempting the most
            # recently admitted sequences until they fit
            cnt = self._cnt
            more = cnt[D % bs]
            while more > free:   # more > 0: there is a sequence to preempt
                if prefill:
                    s = prefill.pop()
                    free += s.blocks
                    du -= s.blocks
                else:   # its prompt now and the tokens it generated (the last not yet cached)
                    s = running.popitem()[0]
                    n -= 1
                    base = s.base
                    ctx = base + D
                    b = -(-ctx // bs)
                    free += b
                    du -= b
                    self._sum -= base
                    cnt[-base % bs] -= 1
                    s.left = s.fin - D
                    s.prompt = ctx + 1
                    s.key = -1
                    more = cnt[D % bs]
                dr -= 1
                dw += 1
                hit = True
                s.ctx = 0
                s.blocks = 0
                self._waiting.appendleft(s)
                self._log.preempted.append(now)
            if more:
                free -= more
                du += more
                hit = True
        budget = self._budget - n
        chunks = []
        p = 0
        kp = 0
        if prefill:
            for s in prefill:
                if budget <= 0:
                    break
                ctx = s.ctx
                c = s.prompt - ctx
                if c > budget:
                    c = budget
                more = -(-(ctx + c) // bs) - s.blocks
                if more > free:   # as much as the free blocks hold
                    c = (s.blocks + free) * bs - ctx
                    if c > budget:
                        c = budget
                    if c <= 0:
                        continue
                    more = -(-(ctx + c) // bs) - s.blocks
                if more > 0:
                    free -= more
                    s.blocks += more
                    du += more
                    hit = True
                chunks.append((s, c))
                p += c
                kp += ctx
                budget -= c
        waiting = self._waiting
        if waiting and budget > 0:
            seqs = n + len(prefill)
            maxs = self._max_seqs
            startc = self._startc
            while seqs < maxs:
                s = waiting[0]
                c = s.prompt
                if c > budget:
                    c = budget
                more = -(-c // bs)   # a waiting sequence holds no block
                if more > free:
                    break
                waiting.popleft()
                free -= more
                s.blocks = more
                du += more
                prefill.append(s)
                seqs += 1
                dr += 1
                dw -= 1
                hit = True
                if not s.admitted:   # its wait ends at its first admission
                    s.admitted = True
                    startc[s.i] = now
                chunks.append((s, c))
                p += c
                budget -= c
                if not waiting or budget <= 0:
                    break
        self._free = free
        if hit:
            self._llm.extend((now, dr, dw, du, 0))
        one = self._one
        if chunks:
            self._chunks = chunks
            self._p = p
            self._run = None
            k = self._sum + n * D + kp
            if one is None:
                at = now + self._step_time.time(n, k, p)
            else:   # StepTime.time, inlined
                a, b, c, d = one
                at = now + (self._ov + (a + b * n + c * k + d * p))
        elif n:
            self._decode(now, n, free)
            return
        else:
            self._pending = None
            return
        spares = self._spares   # self._schedule(at), inlined
        if spares:
            call = spares.pop()
            call.callbacks = self._cbs
        else:
            call = Call(self._cbs)
        self._pending = call
        e = self._entry = (at, NORMAL, next(self._eid), call)
        heappush(self._queue, e)

    def _decode(self, now: float, n: int, free: int) -> None:
        """The step composed at ``now`` decodes only (``n`` sequences, ``free`` blocks left after their
        next token's): schedule the end of the run of such steps, until a sequence finishes, the cache
        runs out, or a start cuts it."""
        D = self._D
        heap = self._heap
        top = heap[0]
        while top[2].key != top[1]:
            heappop(heap)
            top = heap[0]
        m = top[0] - D
        if m > 1 and n * (-(-(m - 1) // self._bs)) > free:
            m = self._steps_in_cache(m, free)
        k = self._sum + n * D
        self._chunks = ()
        self._p = 0
        one = self._one
        if one is None:   # the envelope of the run's steps, found once for it and its cut
            ev = self._step_time.envelope(n, float(k), m)
            self._run = (now, m, ev, 0.0)
            at = now + ev.time(m)
        else:   # StepTime.decode_time, inlined
            a, b, c, d = one
            a1 = self._ov + (a + b * n + c * k)
            s = c * n
            self._run = (now, m, a1, s)
            at = now + (m * a1 + s * m * (m - 1) / 2.0)
        spares = self._spares   # self._schedule(at), inlined
        if spares:
            call = spares.pop()
            call.callbacks = self._cbs
        else:
            call = Call(self._cbs)
        self._pending = call
        e = self._entry = (at, NORMAL, next(self._eid), call)
        heappush(self._queue, e)

    def _steps_in_cache(self, m: int, free: int) -> int:
        """The most decode steps (at least 1, at most ``m``) that the free blocks cover: the first step's
        blocks are already held, steps 1 .. j-1 take those of :meth:`_allocs`."""
        bs = self._bs
        first = self._D + 1
        if self._allocs(first, m - 1) <= free:
            return m
        lo, hi = 1, m   # lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._allocs(first, mid - 1) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def _end_step(self, call: Call) -> None:
        self._pending = None
        if self.dead:
            return
        now = self._env._now
        du = 0
        running = self._running
        bs = self._bs
        D = self._D
        run = self._run
        if run is not None:
            j = run[1] - 1   # the run's steps after its first
            self._run = None
            if j and running:   # the blocks they took (_steps_in_cache): self._allocs(D + 1, j), inlined
                cnt = self._cnt
                rem = j
                if j >= bs:
                    du = j // bs * len(running)
                    rem = j % bs
                if rem:
                    a = (D + 1) % bs
                    e = a + rem
                    du += sum(cnt[a:e]) if e <= bs else sum(cnt[a:]) + sum(cnt[:e - bs])
                self._free -= du
            D += j + 1
        else:
            D += 1
        self._D = D
        finished: list[int] = []
        heap = self._heap
        if heap and heap[0][0] <= D:
            # the sequences that finish (their entry's key is theirs: not stale); a finished one's
            # key stays, matching no other entry of it
            cnt = self._cnt
            freed = 0
            total = self._sum
            while True:
                fin, key, s = heappop(heap)
                if s.key == key:
                    del running[s]
                    base = s.base
                    total -= base
                    cnt[-base % bs] -= 1
                    freed += -(-(base + D) // bs)
                    finished.append(s.i)
                if not heap or heap[0][0] > D:
                    break
            self._sum = total
            self._free += freed
            du -= freed
        chunks = self._chunks
        if chunks:
            prefill = self._prefill
            first = self._first
            for s, c in chunks:
                ctx = s.ctx = s.ctx + c
                if ctx >= s.prompt:   # prefill complete: the step's end gives the next token
                    prefill.remove(s)
                    i = s.i
                    if first[i] != first[i]:   # (nan: its first)
                        first[i] = now
                    left = s.left = s.left - 1
                    if left <= 0:
                        self._free += s.blocks
                        du -= s.blocks
                        finished.append(i)
                    else:   # it decodes from the next step: its cache holds ctx = base + D tokens
                        base = s.base = ctx - D
                        key = s.key = next(self._keys)
                        s.fin = D + left
                        running[s] = None
                        heappush(heap, (D + left, key, s))
                        self._sum += base
                        self._cnt[-base % bs] += 1
            self._chunks = ()
            self._p = 0
        dr = 0
        if finished:
            dr = -len(finished)
            self.busy += dr
            svc = self._svc
            start = self._startc
            self._firing = True
            try:
                done = self.done
                for i in finished:
                    svc[i] = now - start[i]   # its time in service: admission to its last token
                    done(i, self)
            finally:
                self._firing = False
        dw = self._dw
        if dw:
            self._dw = 0
        if self.dead:
            if finished or du:
                self._llm.extend((now, dr, dw, du, 0))
            return
        hit = True if finished else du != 0
        n = len(running)
        if not n or self._prefill or self._waiting:
            self._spares.append(call)   # (for _step to reuse)
            self._step(now, dr, dw, du, hit)
            return
        # The usual case: none in prefill, none waiting: the next step decodes only (_step's path for
        # it, written out), unless the running sequences' next blocks do not fit (preemption: _step).
        free = self._free
        more = self._cnt[D % bs]
        if more > free:
            self._spares.append(call)
            self._step(now, dr, dw, du, hit)
            return
        if more:
            free -= more
            du += more
            hit = True
        self._free = free
        if hit:
            self._llm.extend((now, dr, dw, du, 0))
        # the decode run from now (_decode, written out; the step's chunks are cleared already)
        top = heap[0]
        while top[2].key != top[1]:
            heappop(heap)
            top = heap[0]
        m = top[0] - D
        if m > 1 and n * (-(-(m - 1) // bs)) > free:
            m = self._steps_in_cache(m, free)
        k = self._sum + n * D
        one = self._one
        if one is None:
            ev = self._step_time.envelope(n, float(k), m)
            self._run = (now, m, ev, 0.0)
            at = now + ev.time(m)
        else:
            a, b, c, d = one
            a1 = self._ov + (a + b * n + c * k)
            s = c * n
            self._run = (now, m, a1, s)
            at = now + (m * a1 + s * m * (m - 1) / 2.0)
        call.callbacks = self._cbs   # (the entry that came up, scheduled again)
        self._pending = call
        e = self._entry = (at, NORMAL, next(self._eid), call)
        heappush(self._queue, e)

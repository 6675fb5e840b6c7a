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
boundary. Steps that prefill are one event each (a prompt takes ``ceil(tokens / budget)`` of them).

``busy`` counts the requests handed to the device (running, in prefill and waiting). The endpoint's
log gets every change of the running and waiting sequences and of the KV blocks used, as deltas
``(t, running, waiting, blocks used, blocks)`` (:attr:`EndpointLog.llm`), and the preemptions.
"""
from __future__ import annotations

from collections import deque
from heapq import heappush

from simpy.core import NORMAL

from ..core.engine import NO_CAPACITY, Call
from .device import Device, DeviceSet, Done  # noqa: F401 (DeviceSet: types)


class _Seq:
    """A sequence on the device: its request, the tokens its next prefill computes (``prompt``; its
    prompt, and after a preemption the tokens it had generated too), the tokens in its KV cache
    (``ctx``), the output tokens still to come (``left``) and its blocks."""

    __slots__ = ("i", "prompt", "ctx", "left", "blocks", "admitted")

    def __init__(self, i: int, prompt: int, left: int):
        self.i = i
        self.prompt = prompt
        self.ctx = 0
        self.left = left
        self.blocks = 0
        self.admitted = False


class ContinuousBatching(Device):
    """Iteration-level scheduling of one language model's copy (see the module's doc)."""

    __slots__ = ("_cfg", "_step_time", "_bs", "_free", "_blocks", "_waiting", "_prefill", "_running",
                 "_pending", "_run", "_chunks", "_log", "_cbs", "_firing")

    def __init__(self, devices: DeviceSet, index: int, done: Done, cfg):
        super().__init__(devices, index, done)
        self._cfg = cfg
        self._step_time = cfg.step
        self._bs = cfg.block_size
        self._blocks = cfg.kv_blocks
        self._free = cfg.kv_blocks
        self._waiting: deque[_Seq] = deque()
        self._prefill: list[_Seq] = []       # admitted, prompt not yet all in the cache (admission order)
        self._running: list[_Seq] = []       # decoding (admission order)
        self._pending: Call | None = None    # the end of the step (or run of decode steps) in progress
        self._run: tuple[float, int, float, int] | None = None   # a decode run: (start, n, K0, steps)
        self._chunks: list[tuple[_Seq, int]] = []                # the prefill chunks of the step in progress
        self._log = devices.log
        self._cbs = [self._end_step]
        self._firing = False                 # in _end_step: a start there waits for its next step
        self._log.llm.append((self._env._now, 0, 0, 0, self._blocks))

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _need(self, tokens: int) -> int:
        return -(-tokens // self._bs)

    def _note(self, running: int = 0, waiting: int = 0, used: int = 0) -> None:
        if running or waiting or used:
            self._log.llm.append((self._env._now, running, waiting, used, 0))

    def _seqs(self) -> int:
        return len(self._running) + len(self._prefill)

    # -- the device interface --------------------------------------------------------------------------
    def start(self, i: int, now: float) -> None:
        r = self._r
        r.device[i] = self.index
        tin, tout = r.tokens(i)
        tin, tout = max(tin, 1), max(tout, 1)
        self.busy += 1
        if self._need(tin + tout) > self._blocks:
            # longer than the whole cache holds (vLLM refuses a prompt beyond max_model_len)
            self.busy -= 1
            self.done(i, self)
            r.status[i] = NO_CAPACITY
            return
        self._waiting.append(_Seq(i, tin, tout))
        self._note(waiting=1)
        if self._firing:
            return
        if self._pending is None:
            self._step(now)
        elif self._run is not None and self._seqs() < self._cfg.max_num_seqs:
            self._cut_run(now)

    def stop(self) -> None:
        super().stop()
        if self._pending is not None:
            self._pending.callbacks = []
            self._pending = None
        # the cache and the queue go with the instance
        self._note(-len(self._running) - len(self._prefill), -len(self._waiting), -(self._blocks - self._free))
        self._log.llm.append((self._env._now, 0, 0, 0, -self._blocks))

    # -- steps --------------------------------------------------------------------------------------------
    def _schedule(self, at: float) -> None:
        env = self._env
        call = self._pending = Call(self._cbs)
        heappush(env._queue, (at, NORMAL, next(env._eid), call))

    def _cut_run(self, now: float) -> None:
        """An arrival during a decode run: the run ends with the step in progress."""
        t0, n, k0, m = self._run
        st = self._step_time
        done = st.decode_steps_within(n, k0, now - t0, m)
        if done + 1 >= m:
            return   # the run's last step is the one in progress
        self._pending.callbacks = []
        self._run = (t0, n, k0, done + 1)
        self._schedule(t0 + st.decode_time(n, k0, done + 1))

    def _preempt(self) -> bool:
        """Free the most recently admitted sequence's blocks; it waits at the head of the queue to be
        computed again. False if there is none to preempt."""
        victims = self._prefill if self._prefill else self._running
        if not victims:
            return False
        s = victims.pop()
        self._free += s.blocks
        self._note(running=-1, waiting=1, used=-s.blocks)
        if victims is self._running:   # its prompt now and the tokens it generated (the last not yet cached)
            s.prompt = s.ctx + 1
        s.ctx = 0
        s.blocks = 0
        self._waiting.appendleft(s)
        self._log.preempted.append(self._env._now)
        return True

    def _grow(self, s: _Seq, tokens: int) -> bool:
        """Blocks for ``s`` to hold ``tokens`` in its cache; False if the cache has too few free."""
        more = self._need(tokens) - s.blocks
        if more <= 0:
            return True
        if more > self._free:
            return False
        self._free -= more
        s.blocks += more
        self._note(used=more)
        return True

    def _step(self, now: float) -> None:
        """Compose the next step at ``now`` and schedule its end (nothing when the device is idle)."""
        cfg = self._cfg
        running = self._running
        # every decoding sequence writes one token this step: blocks for it, preempting the most recently
        # admitted sequences until they fit
        bs = self._bs
        while True:
            more = sum(1 for s in running if s.ctx + 1 > s.blocks * bs)
            if more <= self._free or not self._preempt():
                break
        for s in running:
            if s.ctx + 1 > s.blocks * bs:
                s.blocks += 1
        self._free -= more
        self._note(used=more)
        budget = cfg.max_num_batched_tokens - len(running)
        chunks = []
        for s in list(self._prefill):
            if budget <= 0:
                break
            c = min(s.prompt - s.ctx, budget)
            if not self._grow(s, s.ctx + c):
                c = max(0, (s.blocks + self._free) * self._bs - s.ctx)
                c = min(c, budget)
                if c <= 0 or not self._grow(s, s.ctx + c):
                    continue
            chunks.append((s, c))
            budget -= c
        waiting = self._waiting
        while waiting and budget > 0 and self._seqs() < cfg.max_num_seqs:
            s = waiting[0]
            c = min(s.prompt, budget)
            if not self._grow(s, c):
                break
            waiting.popleft()
            self._prefill.append(s)
            self._note(running=1, waiting=-1)
            if not s.admitted:   # its wait ends at its first admission
                s.admitted = True
                self._r.start[s.i] = now
            chunks.append((s, c))
            budget -= c
        n = len(running)
        if not chunks and not n:
            self._pending = None
            return
        k = sum(s.ctx for s in running)
        st = self._step_time
        if chunks:
            p = sum(c for _, c in chunks)
            kp = sum(s.ctx for s, _ in chunks)
            self._chunks = chunks
            self._run = None
            self._schedule(now + st.time(n, k + kp, p))
            return
        # decode only: until a sequence finishes, the cache runs out, or an arrival cuts it
        m = min(s.left for s in running)
        m = min(m, self._steps_in_cache(m))
        self._chunks = []
        self._run = (now, n, float(k), m)
        self._schedule(now + st.decode_time(n, k, m))

    def _steps_in_cache(self, m: int) -> int:
        """The most decode steps (at least 1, at most ``m``) that the free blocks cover: step ``j`` needs
        each running sequence to hold ``ctx + j + 1`` tokens (the first step's are already held)."""
        bs = self._bs
        running = self._running
        free = self._free

        def fits(j: int) -> bool:   # the blocks steps 0..j-1 need beyond those held
            return sum(max(0, -(-(s.ctx + j) // bs) - s.blocks) for s in running) <= free

        if fits(m):
            return m
        lo, hi = 1, m   # fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def _end_step(self, call: Call) -> None:
        self._pending = None
        if self.dead:
            return
        now = self._env._now
        finished: list[int] = []
        running = self._running
        steps = 1
        if self._run is not None:
            steps = self._run[3]
            self._run = None
        bs = self._bs
        used = 0
        keep = []
        for s in running:
            s.ctx += steps
            s.left -= steps
            more = -(-s.ctx // bs) - s.blocks
            if more > 0:   # blocks a run's later steps took (within the free ones: _steps_in_cache)
                s.blocks += more
                self._free -= more
                used += more
            if s.left <= 0:
                self._free += s.blocks
                used -= s.blocks
                finished.append(s.i)
            else:
                keep.append(s)
        self._running = keep
        for s, c in self._chunks:
            s.ctx += c
            if s.ctx >= s.prompt:   # prefill complete: the step's end gives the next token
                self._prefill.remove(s)
                self._r.first_token.setdefault(s.i, now)
                s.left -= 1
                if s.left <= 0:
                    self._free += s.blocks
                    used -= s.blocks
                    finished.append(s.i)
                else:
                    self._running.append(s)
        self._chunks = []
        self._note(running=-len(finished), used=used)
        self.busy -= len(finished)
        r = self._r
        for i in finished:   # its time in service: admission to its last token
            r.service[i] = now - r.start[i]
        self._firing = True
        try:
            for i in finished:
                self.done(i, self)
        finally:
            self._firing = False
        if not self.dead:
            self._step(now)


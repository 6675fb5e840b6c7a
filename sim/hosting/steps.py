"""The time of one iteration (step) of a continuous-batching engine, and of runs of steps in closed form.

A step serves ``n`` decode sequences whose KV caches hold ``K`` tokens in all, and ``p`` prefill
tokens. Every step model capsim knows is an overhead plus the largest of a few affine terms::

    time(n, K, p) = overhead + max_i (a_i + b_i n + c_i K + d_i p)

The calibrated and given models (``{base, per_prefill_token, per_decode_seq, per_kv_token}``) are one
term; the roofline is two (memory time and compute time) whose larger one sets the pace.

While a batch's composition does not change, its steps differ only by the growing context: each step
adds one token to each of the ``n`` sequences, so step ``j`` of a run sees ``K0 + n j`` tokens and every
term grows linearly in ``j``. The time of ``m`` such steps is the sum of an upper envelope of lines,
computed in closed form (:meth:`StepTime.decode_time`), and the steps that fit in a span of time by
bisection on it (:meth:`StepTime.decode_steps_within`): simulating a request does not cost more with a
longer output.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import sqrt


@dataclass(frozen=True)
class StepTime:
    """``overhead + max_i(a_i + b_i n + c_i K + d_i p)`` seconds; ``terms`` are ``(a, b, c, d)``, each
    coefficient finite and >= 0. ``source`` says where the figures come from (shown in reports)."""

    overhead: float
    terms: tuple[tuple[float, float, float, float], ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("a step model needs at least one term")
        for t in self.terms:
            if len(t) != 4 or any(not (x >= 0.0) or x == float("inf") for x in t):
                raise ValueError(f"step term {t!r}: expected four finite coefficients >= 0")
        if not (self.overhead >= 0.0) or self.overhead == float("inf"):
            raise ValueError(f"step overhead {self.overhead!r}: expected a finite number >= 0")
        # the one term of a one-term model (its runs have a closed form without an envelope), else None
        object.__setattr__(self, "_one", self.terms[0] if len(self.terms) == 1 else None)
        if self.time(0, 0, 1) <= 0.0 and self.time(1, 1, 0) <= 0.0:
            raise ValueError("a step model must take time: every coefficient is 0")

    @classmethod
    def linear(cls, base: float, per_prefill_token: float, per_decode_seq: float, per_kv_token: float,
               source: str = "") -> "StepTime":
        """The one-term model of a calibration profile or of coefficients given."""
        return cls(0.0, ((base, per_decode_seq, per_kv_token, per_prefill_token),), source)

    def time(self, n: int, kv_tokens: float, prefill_tokens: int) -> float:
        """Seconds of one step with ``n`` decode sequences over ``kv_tokens`` context tokens and
        ``prefill_tokens`` prompt tokens."""
        one = self._one
        if one is not None:
            a, b, c, d = one
            return self.overhead + (a + b * n + c * kv_tokens + d * prefill_tokens)
        return self.overhead + max(a + b * n + c * kv_tokens + d * prefill_tokens
                                   for a, b, c, d in self.terms)

    def _lines(self, n: int, k0: float) -> list[tuple[float, float]]:
        """Each term along a decode-only run as ``intercept + slope * j`` (step index ``j``)."""
        return [(a + b * n + c * k0, c * n) for a, b, c, d in self.terms]

    def decode_time(self, n: int, k0: float, m: int) -> float:
        """Seconds of ``m`` decode-only steps of ``n`` sequences whose context starts at ``k0`` tokens
        (step ``j`` sees ``k0 + n j``): the sum over ``j < m`` of the upper envelope, in closed form."""
        if m <= 0:
            return 0.0
        one = self._one
        if one is not None:
            a, b, c, d = one
            a = a + b * n + c * k0
            s = c * n
            return m * (self.overhead + a) + s * m * (m - 1) / 2.0
        return Envelope(self, n, k0, m).time(m)

    def envelope(self, n: int, k0: float, m: int) -> "Envelope":
        """The upper envelope of a decode-only run of at most ``m`` steps (``n`` sequences from ``k0``
        context tokens), its pieces found once: :meth:`Envelope.time` and :meth:`Envelope.steps_within`
        give what :meth:`decode_time` and :meth:`decode_steps_within` give for that run (the same
        floats), without finding them again at each call."""
        return Envelope(self, n, k0, m)

    def decode_steps_within(self, n: int, k0: float, span: float, cap: int) -> int:
        """The most decode-only steps (at most ``cap``) that end within ``span`` seconds. The time of
        ``j`` steps only grows with ``j``: for a one-term model, the root of its quadratic gives the
        answer within a step or two, checked and adjusted on :meth:`decode_time` itself (the same answer
        as a bisection on it); otherwise the root for the fastest term alone bounds it, usually within
        a step, else a bisection."""
        if cap <= 0:
            return 0
        one = self._one
        if one is not None:
            a, b, c, d = one
            a = a + b * n + c * k0
            s = c * n
            return one_term_steps_within(self.overhead + a, s, span, cap)
        return Envelope(self, n, k0, cap).steps_within(span, cap)


class Envelope:
    """A decode-only run's upper envelope, for runs of up to ``m`` steps: its pieces ``(j, end, a, s)``
    (steps ``j .. end - 1`` on the line ``a + s j``). For ``j <= m`` steps, :meth:`time` adds up the
    pieces cut at ``j``: :meth:`StepTime.decode_time` of a model of several terms is this sum for its
    own ``m``, and the pieces of ``j`` steps are these, the last one cut at ``j``: the same float."""

    __slots__ = ("st", "n", "k0", "m", "o", "lines", "pieces")

    def __init__(self, st: StepTime, n: int, k0: float, m: int):
        self.st, self.n, self.k0, self.m = st, n, k0, m
        self.o = st.overhead
        lines = self.lines = st._lines(n, k0)
        pieces = []
        j = 0
        while j < m:
            # the line on top at step j (ties: the steeper, which stays on top; then the first), and where
            # it is overtaken
            a = s = top = 0.0
            first_line = True
            for a2, s2 in lines:
                v = a2 + s2 * j
                if first_line or v > top or (v == top and s2 > s):
                    a, s, top = a2, s2, v
                    first_line = False
            end = m
            for a2, s2 in lines:
                if s2 > s:   # a steeper line overtakes this one at j* = (a - a2) / (s2 - s)
                    cross = (a - a2) / (s2 - s)
                    first = int(cross) + 1 if cross >= j else j + 1   # first whole step strictly past
                    end = min(end, max(first, j + 1))
            pieces.append((j, end, a, s))
            j = end
        self.pieces = pieces

    def time(self, m: int) -> float:
        """``StepTime.decode_time(n, k0, m)``, for ``m`` up to the envelope's."""
        if m <= 0:
            return 0.0
        if m > self.m or self.st._one is not None:   # (a one-term model's closed form is cheaper)
            return self.st.decode_time(self.n, self.k0, m)
        pieces = self.pieces
        if len(pieces) == 1:   # the usual run, one line on top all along: the sum below for its one piece
            a, s = pieces[0][2], pieces[0][3]
            return m * self.o + (m * a + s * (m - 1) * m / 2.0)
        total = m * self.o
        for j, end, a, s in pieces:
            if end > m:
                end = m
            k = end - j
            total += k * a + s * (j + end - 1) * k / 2.0
            if end >= m:
                break
        return total

    def steps_within(self, span: float, cap: int) -> int:
        """``StepTime.decode_steps_within(n, k0, span, cap)`` (its search, on :meth:`time`)."""
        if cap <= 0:
            return 0
        if self.st._one is not None:
            return self.st.decode_steps_within(self.n, self.k0, span, cap)
        time = self.time
        if time(1) > span:
            return 0
        hi = cap
        o = self.o
        for a, s in self.lines:
            a1 = o + a
            if s > 0.0:
                g = ((s / 2.0 - a1) + sqrt((a1 - s / 2.0) ** 2 + 2.0 * s * span)) / s
            elif a1 > 0.0:
                g = span / a1
            else:
                continue
            if g < hi:
                hi = int(g) + 1
        hi = max(hi, 1)
        if hi < cap:
            if time(hi) <= span:
                if time(hi + 1) > span:
                    return hi
                hi = cap   # the bound was off (rounding): search all
            elif time(hi - 1) <= span:
                return hi - 1
        lo = 1
        if time(hi) <= span:
            return hi
        while hi - lo > 1:   # time(lo) <= span < time(hi)
            mid = (lo + hi) // 2
            if time(mid) <= span:
                lo = mid
            else:
                hi = mid
        return lo


def one_term_steps_within(a1: float, s: float, span: float, cap: int) -> int:
    """The most steps (at most ``cap``) of a one-term decode run whose ``j`` steps take ``j a1 + s j (j -
    1) / 2`` seconds that end within ``span``: the root of the quadratic, checked and adjusted on that
    sum (the same answer as a bisection on it)."""
    if a1 > span:   # one step takes a1
        return 0
    half = s / 2.0
    if s > 0.0:
        g = ((half - a1) + sqrt((a1 - half) ** 2 + 2.0 * s * span)) / s
    elif a1 > 0.0:
        g = span / a1
    else:
        g = cap
    j = cap if not (g < cap) else (int(g) if g >= 1.0 else 1)   # also nan/inf: cap
    while j < cap and (j + 1) * a1 + s * (j + 1) * j / 2.0 <= span:
        j += 1
    while j > 1 and j * a1 + s * j * (j - 1) / 2.0 > span:
        j -= 1
    return j

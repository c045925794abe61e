"""The REMI grammar as a small state machine: which tokens keep a sequence decodable.

miditok's REMI decoder is lenient: it silently drops a Pitch without Velocity/Duration, places a Position past the
bar's end in a later bar, and lets a Rest skip whole bars without a Bar token. Generation must never produce such
streams, so sampling is restricted to the tokens this machine allows. It mirrors the decoder's clock (ticks at the
tokenizer's resolution): the current tick, the start and length of the current bar, and the end of the last note
(where a Rest starts). Token classes and values come from the tokenizer's vocabulary, never from fixed ids.

Two modes:
- data mode (`strict=False`) accepts every stream miditok itself writes (rests that cross bar lines, meter
  changes after a Bar); prompts are read in this mode.
- strict mode (generation) additionally keeps rests inside the bar and the meter fixed, so the number of Bar
  tokens equals the number of bars a continuation spans.

`GrammarState`/`RemiGrammar.advance` is the scalar reference (fast for reading one long prompt); `BatchedGrammar`
is the same machine on tensors, with no data-dependent Python branching, so a decode step can be captured in a
CUDA graph. Tests check that the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import torch
from miditok import REMI

# Token classes: defined once, in windows.py (re-exported here, where most users look for them).
from rwkv_music.remi.windows import (  # noqa: F401
    BAR,
    BARPHASE,
    CLASS_NAMES,
    DURATION,
    N_CLASSES,
    OTHER,
    PAD,
    PEDAL,
    PEDALOFF,
    PITCH,
    POSITION,
    REST,
    TEMPO,
    TIMESIG,
    VELOCITY,
    token_classes,
)

# Machine states: the class of the previous token, plus three states for the window's meta tokens and one for
# a finished sample (which may only emit PAD).
S_META_TS, S_META_TEMPO, S_BODY, S_DONE = N_CLASSES, N_CLASSES + 1, N_CLASSES + 2, N_CLASSES + 3
N_STATES = N_CLASSES + 4

# Which classes may follow which (learnt from miditok's REMI encoder and checked on real streams).
_NEXT: dict[int, set[int]] = {
    S_META_TS: {TIMESIG},
    S_META_TEMPO: {TEMPO},
    S_BODY: {BAR},
    BAR: {TIMESIG},  # REMI writes the signature after every Bar
    TIMESIG: {POSITION, BAR},
    POSITION: {PITCH, PEDAL, PEDALOFF, TEMPO},
    TEMPO: {PITCH, POSITION, BAR, REST, PEDAL, PEDALOFF},
    PITCH: {VELOCITY},
    VELOCITY: {DURATION},
    DURATION: {PITCH, POSITION, BAR, REST},
    PEDAL: {PITCH, POSITION, BAR, REST},
    PEDALOFF: {PITCH, POSITION, BAR, REST},
    REST: {REST, POSITION, BAR},
    S_DONE: {PAD},
}
# Data mode only: a Rest that crossed into a bar with a new meter is followed by the TimeSig (no Bar token).
_NEXT_DATA_EXTRA: dict[int, set[int]] = {REST: {TIMESIG}}
# Tokens needed after a token of this class before a Bar may follow (Position: a whole note, Pitch Velocity
# Duration), used to end every sample within its token budget.
_CLOSE_COST = {POSITION: 3, PITCH: 2, VELOCITY: 1, BAR: 1}

PEDAL_UNKNOWN, PEDAL_ON, PEDAL_OFF = 0, 1, 2


class GrammarError(ValueError):
    """A token the grammar does not allow at this point."""


def _beats(value: str) -> Fraction:
    """'1.6.8' -> 1 + 6/8 beats (miditok's duration/rest notation)."""
    beat, num, res = (int(x) for x in value.split("."))
    return beat + Fraction(num, res)


@dataclass
class GrammarState:
    """The decoder's clock and the grammar position of one sequence (ticks at the tokenizer's resolution)."""

    state: int = S_META_TS
    cur: int = 0  # current tick
    cur_min: int = 0  # the next Position must land at or after this tick
    bar_start: int = 0
    bar_len: int = 0
    tpb: int = 0  # ticks per beat of the current meter
    note_end: int = 0  # end of the latest note (or tempo change): where a Rest starts
    pedal: int = PEDAL_UNKNOWN
    bars: int = 0  # Bar tokens seen
    meter: int = -1  # id of the TimeSig token in force
    tempo: int = -1  # id of the Tempo token in force
    tokens: int = 0  # tokens consumed


class RemiGrammar:
    """Token tables of one tokenizer and the scalar reference machine."""

    def __init__(self, tokenizer: REMI):
        vocab: dict[str, int] = tokenizer.vocab
        V = len(vocab)
        self.vocab_size = V
        self.tpq = int(tokenizer.time_division)
        self.pos_per_beat = int(tokenizer.config.max_num_pos_per_beat)
        cls = token_classes(vocab)
        if len(cls) != V:
            raise ValueError("the grammar needs a vocabulary with ids 0..len-1")
        pos_idx = np.full(V, -1, np.int64)
        dur_beats: dict[int, Fraction] = {}
        rest_beats: dict[int, Fraction] = {}
        ts_of: dict[int, tuple[int, int]] = {}
        for token, i in vocab.items():
            value = token.partition("_")[2]
            c = cls[i]
            if c == POSITION:
                pos_idx[i] = int(value)
            elif c == DURATION:
                dur_beats[i] = _beats(value)
            elif c == REST:
                rest_beats[i] = _beats(value)
            elif c == TIMESIG:
                num, den = (int(x) for x in value.split("/"))
                ts_of[i] = (num, den)
        if "Bar_None" not in vocab or not ts_of or not dur_beats:
            raise ValueError("the grammar needs a REMI tokenizer with Bar_None, TimeSig and Duration tokens")
        # Durations and rests in 1/L beat units, L the common resolution, so ticks = units * tpb // L exactly.
        self.unit = math.lcm(*(b.denominator for b in [*dur_beats.values(), *rest_beats.values()]))
        dur_units = np.zeros(V, np.int64)
        rest_units = np.zeros(V, np.int64)
        for i, b in dur_beats.items():
            dur_units[i] = int(b * self.unit)
        for i, b in rest_beats.items():
            rest_units[i] = int(b * self.unit)
        ts_bar = np.zeros(V, np.int64)
        ts_tpb = np.zeros(V, np.int64)
        for i, (num, den) in ts_of.items():
            tpb = self.tpq * 4 // den
            if tpb * den != self.tpq * 4 or tpb % self.unit or tpb % self.pos_per_beat:
                raise ValueError(f"time signature {num}/{den} does not divide the tokenizer's resolution")
            ts_tpb[i], ts_bar[i] = tpb, tpb * num
        self.cls, self.pos_idx, self.dur_units, self.rest_units = cls, pos_idx, dur_units, rest_units
        self.ts_bar, self.ts_tpb = ts_bar, ts_tpb
        self.bar_id = vocab["Bar_None"]
        self.pad_id = vocab.get("PAD_None", -1)
        if self.pad_id < 0:
            raise ValueError("the grammar needs a PAD token for finished samples")
        # [state, V]: which tokens each state allows by class (values are checked separately).
        self.next_class = np.zeros((N_STATES, N_CLASSES), bool)
        self.next_class_data = np.zeros((N_STATES, N_CLASSES), bool)
        for s, nxt in _NEXT.items():
            for c in nxt:
                self.next_class[s, c] = self.next_class_data[s, c] = True
        for s, nxt in _NEXT_DATA_EXTRA.items():
            for c in nxt:
                self.next_class_data[s, c] = True
        # Plain lists for the scalar machine (numpy scalar indexing is slow per token).
        self._cls, self._pos_idx, self._rest_units = cls.tolist(), pos_idx.tolist(), rest_units.tolist()
        self._dur_units, self._ts_bar, self._ts_tpb = dur_units.tolist(), ts_bar.tolist(), ts_tpb.tolist()
        self._next, self._next_data = self.next_class.tolist(), self.next_class_data.tolist()
        self.close_cost = np.zeros(N_STATES, np.int64)
        for s, c in _CLOSE_COST.items():
            self.close_cost[s] = c

    # ----- the scalar reference -----

    def initial(self) -> GrammarState:
        """State before a window's meta tokens ([TimeSig, Tempo] then the first Bar)."""
        return GrammarState()

    def token_ok(self, st: GrammarState, token: int, strict: bool = True) -> bool:
        """Whether `token` may follow (budget forcing is the batched machine's job)."""
        if not 0 <= token < self.vocab_size:
            return False
        c = self._cls[token]
        if not (self._next if strict else self._next_data)[st.state][c]:
            return False
        if c == POSITION:
            tick = self._pos_idx[token] * (st.tpb // self.pos_per_beat)
            return st.bar_start + tick >= st.cur_min and tick < st.bar_len
        if c == REST and strict:
            rest_end = max(st.note_end, st.cur) + self._rest_units[token] * st.tpb // self.unit
            return rest_end < st.bar_start + st.bar_len
        if c == TIMESIG and strict and st.state != S_META_TS and st.meter >= 0:
            return token == st.meter
        if c == PEDAL:
            return st.pedal != PEDAL_ON
        if c == PEDALOFF:
            return st.pedal != PEDAL_OFF
        return True

    def allowed(self, st: GrammarState, strict: bool = True) -> np.ndarray:
        """Boolean mask [V] of the tokens allowed next (slow; for tests and inspection)."""
        return np.array([self.token_ok(st, t, strict) for t in range(self.vocab_size)])

    def advance(self, st: GrammarState, token: int, strict: bool = True) -> GrammarState:
        """The state after `token` (a new object); raises GrammarError if the token is not allowed."""
        return self._step(replace(st), token, strict)

    def _step(self, st: GrammarState, token: int, strict: bool) -> GrammarState:
        """`advance` in place."""
        if not self.token_ok(st, token, strict):
            name = f"{CLASS_NAMES[self._cls[token]]}" if 0 <= token < self.vocab_size else "out of range"
            raise GrammarError(f"token {token} ({name}) not allowed after {_state_name(st.state)}")
        c = self._cls[token]
        st.tokens += 1
        if st.state == S_META_TS:
            st.meter, st.bar_len, st.tpb = token, self._ts_bar[token], self._ts_tpb[token]
            st.state = S_META_TEMPO
            return st
        if st.state == S_META_TEMPO:
            st.tempo, st.state = token, S_BODY
            return st
        if c == BAR:
            if st.bars > 0:  # the decoder: the first Bar starts at tick 0, later ones one bar after the last
                st.bar_start += st.bar_len
            st.cur = st.cur_min = st.bar_start
            st.bars += 1
        elif c == TIMESIG:
            st.meter, st.bar_len, st.tpb = token, self._ts_bar[token], self._ts_tpb[token]
        elif c == POSITION:
            st.cur = st.bar_start + self._pos_idx[token] * (st.tpb // self.pos_per_beat)
            st.cur_min = st.cur + 1
        elif c == DURATION:
            st.note_end = max(st.note_end, st.cur + self._dur_units[token] * st.tpb // self.unit)
        elif c == TEMPO:
            st.tempo = token
            st.note_end = max(st.note_end, st.cur)
        elif c == REST:
            st.cur = max(st.note_end, st.cur) + self._rest_units[token] * st.tpb // self.unit
            # A window cut from a piece does not know the notes held over from before it, so in data mode the
            # rest may have started later than we think: any position of the bar may follow.
            st.cur_min = st.cur if strict else st.bar_start
            if st.cur >= st.bar_start + st.bar_len:  # data mode: the rest ran into later bars
                st.bar_start += (st.cur - st.bar_start) // st.bar_len * st.bar_len
        elif c == PEDAL:
            st.pedal = PEDAL_ON
        elif c == PEDALOFF:
            st.pedal = PEDAL_OFF
        st.state = c
        return st

    def run(self, tokens, meta_len: int = 2, strict: bool = False, st: GrammarState | None = None) -> GrammarState:
        """Feed a window (meta + bars) through the machine; GrammarError names the first bad token's index.

        Meta is [TimeSig, Tempo], or [TimeSig, Tempo, BarPhase] with a bar-phase tokenizer: the BarPhase token
        only has to be one (it says where the window starts, nothing the bars' timing depends on)."""
        skip = -1
        if st is None:
            st = self.initial()
            if meta_len == 0:
                st.state = S_BODY
            elif meta_len == 3:
                skip = 2
            elif meta_len != 2:
                raise ValueError("windows have 0, 2 or 3 (with BarPhase) meta tokens")
        else:
            st = replace(st)
        for i, t in enumerate(tokens):
            if i == skip:
                if not (0 <= int(t) < self.vocab_size and self._cls[int(t)] == BARPHASE):
                    raise GrammarError(f"at token {i}: token {int(t)} is not a BarPhase token (the third meta token)")
                st.tokens += 1
                continue
            try:
                self._step(st, int(t), strict)
            except GrammarError as e:
                raise GrammarError(f"at token {i}: {e}") from None
        return st

    def accepts(self, tokens, meta_len: int = 2, strict: bool = False) -> bool:
        try:
            self.run(tokens, meta_len, strict)
        except GrammarError:
            return False
        return True


def _state_name(s: int) -> str:
    return {S_META_TS: "start", S_META_TEMPO: "meta TimeSig", S_BODY: "meta Tempo", S_DONE: "end"}.get(
        s, CLASS_NAMES.get(s, str(s)))


class BatchedGrammar:
    """The strict machine for B samples on one device: `mask(logits)` then `update(tokens)` per step.

    Every sample starts from the same prompt state; the first generated token must be a Bar, and a sample is
    done at the Bar that would open bar `bars + 1` (that Bar is not part of the continuation). When the budget
    left is just enough to close the open note and the remaining bars, only the shortest path there is
    allowed, so every sample ends with exactly `bars` bars within `max_new_tokens` tokens.
    """

    FIELDS = ("state", "cur", "cur_min", "bar_start", "bar_len", "tpb", "note_end", "pedal", "bars", "meter",
              "tokens")

    def __init__(self, grammar: RemiGrammar, start: GrammarState, batch_size: int, bars: int,
                 max_new_tokens: int, device: torch.device | str = "cpu"):
        if start.bars < 1 or start.state in (S_META_TS, S_META_TEMPO, S_BODY, S_DONE):
            raise ValueError("generation starts after a prompt with at least one bar")
        if not grammar.next_class[start.state, BAR]:
            raise ValueError(f"the prompt ends inside an event ({_state_name(start.state)}); it cannot be continued")
        if bars < 1:
            raise ValueError("bars must be at least 1")
        need = 2 * bars + 1
        if max_new_tokens < need:
            raise ValueError(f"max_new_tokens must be at least {need} for {bars} bar(s)")
        self.g, self.B, self.target, self.budget = grammar, batch_size, bars, max_new_tokens
        dev = torch.device(device)
        self.device = dev
        t = lambda a: torch.as_tensor(a, device=dev)  # noqa: E731
        self.cls, self.pos_idx = t(grammar.cls), t(grammar.pos_idx)
        self.dur_units, self.rest_units = t(grammar.dur_units), t(grammar.rest_units)
        self.ts_bar, self.ts_tpb = t(grammar.ts_bar), t(grammar.ts_tpb)
        self.tok_ok = t(grammar.next_class[:, grammar.cls])  # [S, V]
        self.cost_of_tok = t(grammar.close_cost[grammar.cls])  # [V]: tokens needed after it before a Bar
        self.arange = torch.arange(grammar.vocab_size, device=dev)
        # Per-token constants of the step's mask, made once: mask, sampling and update are ~110 tiny kernels a decode
        # step, so every one spared counts (each is a few microseconds of a CUDA graph replay).
        self.not_pos, self.not_rest, self.not_ts = self.cls != POSITION, self.cls != REST, self.cls != TIMESIG
        self.is_bar = self.cls == BAR
        self.bar_long = self.is_bar.long()
        self.is_pad = self.cls == PAD
        pedal_ok = torch.ones(3, grammar.vocab_size, dtype=torch.bool, device=dev)  # [pedal state, V]
        pedal_ok[PEDAL_ON] = self.cls != PEDAL  # no second PedalOn while down, no PedalOff while up
        pedal_ok[PEDAL_OFF] = self.cls != PEDALOFF
        self.pedal_ok = pedal_ok
        self.cost_m1 = self.cost_of_tok - 1
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=dev)
        self.start = start
        for name in self.FIELDS:
            setattr(self, name, torch.full((batch_size,), int(getattr(start, name)), dtype=torch.long, device=dev))
        self.bars.zero_()  # count the continuation's bars
        self.tokens.zero_()

    def reset(self) -> None:
        """Back to the prompt state in place (tensors keep their storage, for CUDA graph replays)."""
        for name in self.FIELDS:
            getattr(self, name).fill_(int(getattr(self.start, name)))
        self.bars.zero_()
        self.tokens.zero_()
        self.done.zero_()

    def allowed(self) -> torch.Tensor:
        """[B, V] bool: tokens each sample may emit now."""
        ok = self.tok_ok[self.state] & self.pedal_ok[self.pedal]
        tpp = (self.tpb // self.g.pos_per_beat)[:, None]
        pos_tick = self.pos_idx[None, :] * tpp
        pos_fit = (self.bar_start[:, None] + pos_tick >= self.cur_min[:, None]) & (pos_tick < self.bar_len[:, None])
        ok &= self.not_pos | pos_fit
        rest_end = torch.maximum(self.note_end, self.cur)[:, None] + self.rest_units[None, :] * self.tpb[:, None] \
            // self.g.unit
        ok &= self.not_rest | (rest_end < (self.bar_start + self.bar_len)[:, None])
        ok &= self.not_ts | (self.arange[None, :] == self.meter[:, None])
        # The first token of a continuation opens a new bar.
        ok &= (self.tokens > 0)[:, None] | self.is_bar[None, :]
        # Budget: a token is allowed only if the shortest way to the end still fits after it. Each bar still to
        # open costs Bar + TimeSig, the final Bar (which ends the sample) one token.
        need_after = (self.target + 1 - self.bars)[:, None] - self.bar_long[None, :]
        finish_after = torch.where(need_after > 0, self.cost_m1[None, :] + 2 * need_after, 0)
        ok &= finish_after <= (self.budget - 1 - self.tokens)[:, None]
        ok |= self.done[:, None] & self.is_pad[None, :]
        return ok

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Disallowed tokens to -inf (returns a new tensor)."""
        return torch.where(self.allowed(), logits, float("-inf"))

    def update(self, tok: torch.Tensor) -> None:
        """Advance every sample by its sampled token (finished samples stay finished). In place: the tensors keep
        their storage, so a CUDA graph can capture the step, and no copy kernels follow it."""
        tok = tok.to(torch.long)
        c = self.cls[tok]
        live = ~self.done
        is_bar = (c == BAR) & live
        pos = (c == POSITION) & live
        rest = (c == REST) & live
        # the old tpb, note_end and cur, before they are overwritten below
        pos_cur = self.pos_idx[tok] * (self.tpb // self.g.pos_per_beat)
        rest_cur = torch.maximum(self.note_end, self.cur) + self.rest_units[tok] * self.tpb // self.g.unit
        self.bar_start.add_(self.bar_len * is_bar)  # a Bar starts the next bar where this one ends
        self.bars.add_(is_bar)
        pos_cur += self.bar_start
        cur = torch.where(is_bar, self.bar_start, self.cur)
        cur = torch.where(pos, pos_cur, cur)
        torch.where(rest, rest_cur, cur, out=self.cur)
        cur = self.cur
        torch.where(is_bar | rest, cur, torch.where(pos, cur + 1, self.cur_min), out=self.cur_min)
        dur = (c == DURATION) & live
        torch.where(dur, torch.maximum(self.note_end, cur + self.dur_units[tok] * self.tpb // self.g.unit),
                    self.note_end, out=self.note_end)
        tempo = (c == TEMPO) & live
        torch.where(tempo, torch.maximum(self.note_end, cur), self.note_end, out=self.note_end)
        ts = (c == TIMESIG) & live
        torch.where(ts, self.ts_bar[tok], self.bar_len, out=self.bar_len)
        torch.where(ts, self.ts_tpb[tok], self.tpb, out=self.tpb)
        torch.where(ts, tok, self.meter, out=self.meter)
        self.pedal.masked_fill_((c == PEDAL) & live, PEDAL_ON)
        self.pedal.masked_fill_((c == PEDALOFF) & live, PEDAL_OFF)
        self.tokens.add_(live)
        self.done |= is_bar & (self.bars > self.target)
        torch.where(live, c, self.state, out=self.state)
        self.state.masked_fill_(self.done, S_DONE)

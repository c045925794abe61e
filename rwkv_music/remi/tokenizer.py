"""The REMI tokenizer and the piano merge: the one place that turns a MIDI file into a token stream.

The pipeline, generation and evaluation all call these functions, so training data and prompts can never
be tokenized differently. The tokenizer's configuration is hashed; the hash ties shards to checkpoints.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import symusic
from miditok import REMI, TokenizerConfig

from rwkv_music.atomic import atomic_path
from rwkv_music.errors import error_line

# Meters seen in real corpora (2/2, 3/8, 6/8, 9/8, 12/8, 5/4, 7/8, ...). miditok drops signatures outside
# this range and then counts bars wrongly, so anything else is mapped to an equivalent one (and counted).
TIME_SIGNATURE_RANGE: dict[int, list[int]] = {
    2: [1, 2, 3, 4],
    4: list(range(1, 13)),
    8: list(range(1, 19)),
    16: [3, 5, 6, 7, 9, 12, 15],
}

DEFAULT_TOKENIZER_PARAMS: dict = {
    "pitch_range": (21, 109),  # piano keys A0..C8; miditok includes the upper end, so Pitch_109 exists too
    "beat_res": {(0, 4): 8, (4, 12): 4},
    "num_velocities": 32,
    "special_tokens": ["PAD", "BOS", "EOS"],
    # No Rest tokens: miditok's REMI measures a rest from the previous note's end and then skips the Bar
    # tokens of the bars it crosses, so a window of N Bar tokens could span more than N bars. Without rests
    # every bar, empty or not, starts with its own Bar token and bar counting stays exact.
    "use_rests": False,
    "use_tempos": True,
    "num_tempos": 32,
    "tempo_range": (40, 250),
    "use_time_signatures": True,
    "time_signature_range": TIME_SIGNATURE_RANGE,
    "use_sustain_pedals": True,
    "use_programs": False,
}

PIANO_PROGRAM = 0


class MidiRejected(Exception):
    """A file that cannot become training data; `reason` is a short class name for rejects.jsonl."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class PianoScore:
    """A parsed, merged piece and what had to be changed to tokenize it faithfully."""

    score: symusic.Score
    time_signatures_changed: int  # signatures outside the tokenizer's range that were rewritten


def build_tokenizer(overrides: dict | None = None) -> REMI:
    """REMI with the project's defaults; `overrides` replace individual TokenizerConfig fields.

    ValueError for overrides miditok cannot build a tokenizer from, naming the parameter where one alone is to
    blame (miditok itself fails with whatever its code meets first, e.g. AttributeError on a number for a dict)."""
    params = dict(DEFAULT_TOKENIZER_PARAMS)
    if overrides:
        _check_override_types(overrides)
        params.update(overrides)
    try:
        return _remi(params)
    except Exception as e:
        if not overrides:
            raise
        if len(overrides) > 1:  # the one parameter whose removal lets the rest build is to blame
            culprits = [k for k in overrides
                        if _build_error({**DEFAULT_TOKENIZER_PARAMS, **{o: v for o, v in overrides.items() if o != k}})
                        is None]
        else:
            culprits = list(overrides)
        if len(culprits) == 1:
            key = culprits[0]
            raise ValueError(f"tokenizer parameter {key} = {overrides[key]!r} is not valid: {error_line(e)}") from e
        raise ValueError(f"tokenizer parameters {', '.join(sorted(overrides))} do not fit together: "
                         f"{error_line(e)}") from e


def _check_override_types(overrides: dict) -> None:
    """Unknown names, and values miditok would silently misread: any non-empty string is a true flag to it."""
    defaults = TokenizerConfig().__dict__
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"unknown tokenizer parameter(s): {', '.join(sorted(unknown))}")
    # miditok's own annotations (strings: its module defers them); a default of 1 may be a float parameter
    kinds = {k: str(prm.annotation) for k, prm in inspect.signature(TokenizerConfig.__init__).parameters.items()}
    for key, v in overrides.items():
        kind = kinds.get(key)
        if kind == "bool" and not isinstance(v, bool):
            raise ValueError(f"tokenizer parameter {key} must be true or false, not {v!r}")
        if kind == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"tokenizer parameter {key} must be an integer, not {v!r}")
        if kind == "float" and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise ValueError(f"tokenizer parameter {key} must be a number, not {v!r}")


def _remi(params: dict) -> REMI:
    params = dict(params)
    params["beat_res"] = {tuple(k): v for k, v in _beat_res_items(params["beat_res"])}
    params["time_signature_range"] = {int(k): list(v) for k, v in params["time_signature_range"].items()}
    return REMI(TokenizerConfig(**params))


def _build_error(params: dict) -> Exception | None:
    try:
        _remi(params)
    except Exception as e:
        return e
    return None


def _beat_res_items(beat_res) -> list[tuple[tuple[int, int], int]]:
    """Accept {(0,4): 8} or the JSON-friendly {"0_4": 8} form used in config files."""
    items = []
    for k, v in beat_res.items():
        if isinstance(k, str):
            lo, hi = (int(x) for x in k.split("_"))
            k = (lo, hi)
        items.append((tuple(k), int(v)))
    return items


def load_tokenizer_overrides(path: str | os.PathLike) -> dict:
    """Read a JSON (or TOML) file of TokenizerConfig overrides for `--tokenizer-config`, checked by building the
    tokenizer once: ValueError naming the file (and the parameter, where one is to blame) for anything unusable."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} cannot be read: {e}") from None
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as e:  # JSONDecodeError, TOMLDecodeError
        raise ValueError(f"{path} is not readable {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of tokenizer parameters")
    try:
        build_tokenizer(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return data


MAX_BAR_PHASE = 64


def with_bar_phase(overrides: dict | None, period: int) -> dict | None:
    """Tokenizer overrides that add BarPhase_0 .. BarPhase_{period-1} to the special tokens (0: unchanged).

    Every window then starts with the phase of its first bar in the piece (remi/windows.py); the tokens live in
    the tokenizer, which travels with the shards and checkpoints, so nothing else has to remember the option."""
    from rwkv_music.remi.windows import BAR_PHASE

    if isinstance(period, bool) or not isinstance(period, int) or not 0 <= period <= MAX_BAR_PHASE:
        raise ValueError(f"the bar phase period must be an integer in 0..{MAX_BAR_PHASE}, not {period!r}")
    if period == 0:
        return overrides
    out = dict(overrides or {})
    special = list(out.get("special_tokens", DEFAULT_TOKENIZER_PARAMS["special_tokens"]))
    if any(str(t).startswith(BAR_PHASE) for t in special):
        raise ValueError(f"the tokenizer configuration already has {BAR_PHASE} tokens; give the period once")
    out["special_tokens"] = [*special, *(f"{BAR_PHASE}_{k}" for k in range(period))]
    return out


def tokenizer_from_file(path: str | os.PathLike) -> REMI:
    """Load a tokenizer saved by `save_tokenizer` (miditok's own JSON format)."""
    return REMI(params=Path(path))


def save_tokenizer(tokenizer: REMI, path: str | os.PathLike) -> None:
    """Write the tokenizer JSON atomically."""
    with atomic_path(path, suffix=".json") as tmp:
        tokenizer.save(tmp)


def tokenizer_hash(tokenizer: REMI) -> str:
    """sha256 of the vocabulary and the configuration: equal hashes mean identical token ids."""
    cfg = tokenizer.config.to_dict(serialize=True)
    cfg.pop("miditok_version", None)
    blob = json.dumps({"vocab": tokenizer.vocab, "config": cfg}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _supported_signature(num: int, den: int, tokenizer: REMI) -> tuple[int, int]:
    """The closest signature the tokenizer can express with the same bar length where possible."""
    ranges = tokenizer.config.time_signature_range
    if den in ranges and num in ranges[den]:
        return num, den
    bar = Fraction(num, den)  # bar length in whole notes
    for d in sorted(ranges):  # same bar length, another denominator (e.g. 4/2 -> 8/4)
        n = bar * d
        if n.denominator == 1 and int(n) in ranges[d]:
            return int(n), d
    # No exact match: the largest expressible bar not longer than this one, else 4/4.
    best = (4, 4)
    best_len = Fraction(0)
    for d, nums in ranges.items():
        for n in nums:
            length = Fraction(n, d)
            if best_len < length <= bar:
                best, best_len = (n, d), length
    return best


def load_piano_score(source: str | os.PathLike | bytes, tokenizer: REMI) -> PianoScore:
    """Parse a MIDI file and merge every non-drum track into one piano track.

    Raises MidiRejected for files that cannot be parsed or hold no pitched notes.
    """
    try:
        score = symusic.Score.from_midi(source) if isinstance(source, bytes) else symusic.Score(str(source))
    except Exception as e:  # symusic raises plain RuntimeError/ValueError for corrupt data
        raise MidiRejected("parse-error", str(e) or type(e).__name__) from e
    if score.tpq <= 0:
        raise MidiRejected("parse-error", f"invalid ticks per quarter {score.tpq}")
    pitched = [t for t in score.tracks if not t.is_drum]
    if not pitched:
        raise MidiRejected("no-pitched-tracks", "the file has no non-drum tracks")
    piano = symusic.Track("piano", PIANO_PROGRAM, False)
    for t in pitched:
        piano.notes.extend(t.notes)
        piano.pedals.extend(t.pedals)
    if len(piano.notes) == 0:
        raise MidiRejected("no-notes", "the file's pitched tracks contain no notes")
    piano.notes.sort()
    piano.pedals.sort()
    merged = symusic.Score(score.tpq)
    merged.tempos = score.tempos
    changed = 0
    signatures = []
    for ts in score.time_signatures:
        num, den = _supported_signature(ts.numerator, ts.denominator, tokenizer)
        if (num, den) != (ts.numerator, ts.denominator):
            changed += 1
        signatures.append(symusic.TimeSignature(ts.time, num, den))
    merged.time_signatures = signatures
    merged.tracks.append(piano)
    return PianoScore(merged, changed)


def encode_piano(piano: PianoScore, tokenizer: REMI) -> list[int]:
    """Token ids of the merged piano track (one REMI stream, starting with a Bar token)."""
    seq = tokenizer.encode(piano.score)
    if isinstance(seq, list):
        seq = seq[0]
    return list(seq.ids)

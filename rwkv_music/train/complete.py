"""The piano copilot: continue a prompt by a few bars, several variations at once.

The prompt is tokenized and cut exactly like a training window (`build_prompt`: meta tokens, then the last
context bars), prefilled in one parallel forward, then decoded in RNN mode for all samples as one batch. Every
step masks the logits with the REMI grammar (`grammar.BatchedGrammar`) and samples with per-sample random streams
(`sampling`), so each continuation decodes to valid MIDI, has exactly the requested number of bars and is
reproducible from its seed alone. On CUDA the decode step (mask, sample, grammar update, model step) can be
captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import symusic
import torch
from miditok import REMI
from torch import Tensor

from rwkv_music.model.fast_step import FastStep, unsupported_reason
from rwkv_music.remi.grammar import BAR, PITCH, BatchedGrammar, GrammarError, GrammarState, RemiGrammar
from rwkv_music.remi.tokenizer import MidiRejected, PianoScore, encode_piano, load_piano_score
from rwkv_music.remi.windows import Vocab, Window, build_prompt, decode_window
from rwkv_music.train.consensus import consensus_index, continuation_metrics
from rwkv_music.train.sampling import SamplingConfig, draw_uniforms, sample

# A progress callback of `generate`: (decode steps run, bars finished per sample).
Progress = Callable[[int, list[int]], None]

DEFAULT_TOKENS_PER_BAR = 384  # budget per requested bar; dense piano bars in the test corpus stay well below
# Rows decoded as one batch (a sample's candidates are rows of the same batch); more samples are generated in batches
# one after the other. The decode state grows with the batch (about 6 MB a row for the large preset in float32),
# and 100000 samples at once would not fit in memory; sample k depends only on its seed, so the split changes no
# sample.
MAX_BATCH = 256
# Samples of one call: each is held (three scores, ~100 KB) until all are written, and makes two or three files.
MAX_SAMPLES = 10000


class CompletionError(Exception):
    """A problem with the user's input (prompt or checkpoint), reported as one line."""


@dataclass(frozen=True)
class CompleteConfig:
    bars: int = 2
    context_bars: int | None = 4  # None: the whole prompt
    num_samples: int = 4
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    max_new_tokens: int | None = None  # None: DEFAULT_TOKENS_PER_BAR * bars
    max_seq_len: int = 2048  # prompt window length limit (leading context bars are dropped beyond it)
    cuda_graph: bool = True  # capture the decode step on CUDA
    compile_step: bool = False  # torch.compile the model step (slow first call; faster steps)
    fast_step: bool = True  # CUDA: the fused prefill and decode kernels (model/fast_step.py); False: readable
    first_bar: int = 0  # the prompt's first bar number in the piece (the BarPhase token of tokenizers with one)
    max_batch: int = MAX_BATCH  # rows decoded together (at least one sample and its candidates)

    def __post_init__(self):
        if self.bars < 1:
            raise ValueError("bars must be at least 1")
        if self.context_bars is not None and self.context_bars < 1:
            raise ValueError("context_bars must be at least 1 (or None for all)")
        if not 1 <= self.num_samples <= MAX_SAMPLES:
            raise ValueError(f"num_samples must be in 1 .. {MAX_SAMPLES}, got {self.num_samples} (every sample is "
                             f"held in memory until all are returned; for more, call again with seed + {MAX_SAMPLES})")
        if self.first_bar < 0:
            raise ValueError("first_bar must be >= 0")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")

    @property
    def budget(self) -> int:
        return self.max_new_tokens if self.max_new_tokens is not None else DEFAULT_TOKENS_PER_BAR * self.bars


@dataclass
class Sample:
    index: int
    seed: int
    tokens: list[int]  # the continuation: starts with Bar, `bars` Bar tokens in all
    score: symusic.Score  # the whole prompt + continuation; tracks "prompt" and "continuation"
    continuation: symusic.Score  # the continuation alone, time 0 = its first bar
    window_score: symusic.Score  # prompt window + continuation (what the model saw and wrote), time 0 = window start
    continuation_tick: int  # where the continuation starts in `score`
    window_continuation_tick: int  # ... and in `window_score`
    bars: int  # Bar tokens in `tokens`
    candidate: int | None = None  # with --candidates: the one kept (0 is the plain sample's own seed)


@dataclass
class Completion:
    prompt_ids: list[int]  # the whole tokenized prompt
    window: Window  # the model input (meta + context bars)
    samples: list[Sample]
    tpq: int  # ticks per quarter of every Score here


# ----------------------------------------------------------------------------------------------------------------
# Prompt


def tokenize_prompt(prompt: str | os.PathLike | bytes | PianoScore | symusic.Score, tokenizer: REMI) -> list[int]:
    """Token ids of the prompt after the pipeline's piano merge; CompletionError for unusable input."""
    if isinstance(prompt, symusic.Score):
        prompt = prompt.dumps_midi()
    if not isinstance(prompt, PianoScore):
        if not isinstance(prompt, bytes) and not Path(prompt).is_file():
            raise CompletionError(f"prompt file not found: {prompt}")
        try:
            prompt = load_piano_score(prompt, tokenizer)
        except MidiRejected as e:
            if e.reason == "parse-error":
                raise CompletionError(f"cannot read the prompt as MIDI: {e.message}") from None
            raise CompletionError(f"the prompt has no notes ({e.message})") from None
    ids = encode_piano(prompt, tokenizer)
    grammar_classes = RemiGrammar(tokenizer).cls
    if not any(grammar_classes[t] == PITCH for t in ids):
        raise CompletionError("the prompt has no notes in the tokenizer's pitch range")
    return ids


def prompt_window(ids: list[int], tokenizer: REMI, context_bars: int | None, max_seq_len: int,
                  first_bar: int = 0) -> Window:
    """The model input, built exactly like a training window."""
    try:
        return build_prompt(ids, Vocab(tokenizer), context_bars, max_seq_len, first_bar)
    except ValueError as e:
        raise CompletionError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------------
# Decoding


@torch.no_grad()
def prefill(model, tokens: list[int], device: torch.device, fast: FastStep | None = None) -> tuple[Tensor, object]:
    """One parallel forward over the prompt: logits [1, V] of its last token and the state after it (`fast`: by the
    fused kernels of `FastStep.prefill`, else by the readable model)."""
    idx = torch.tensor([tokens], dtype=torch.long, device=device)
    if fast is not None:
        return fast.prefill(idx)
    last = torch.tensor([len(tokens) - 1], dtype=torch.long, device=device)
    logits, state = model(idx, positions=last, return_state=True)
    return logits.float(), state


class _Decoder:
    """One decode step over static tensors: mask, sample, grammar update, model step."""

    def __init__(self, model, grammar: BatchedGrammar, logits: Tensor, state, u: Tensor, sampling: SamplingConfig,
                 vocab_size: int, pad_id: int, compile_step: bool = False, fast: FastStep | None = None):
        self.model, self.g, self.sampling, self.V = model, grammar, sampling, vocab_size
        self.fast = fast
        # torch.compile fuses the step's many small element-wise kernels (static shapes: one compile). The
        # result is still captured as a CUDA graph by `_run_graph`.
        self.step = torch.compile(self._step, dynamic=False) if compile_step else self._step
        B = grammar.B
        dev = logits.device
        self.logits = logits[:, :vocab_size].float().clone()
        self.state = state
        self.u = u
        self.t = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.full((B, u.shape[1]), pad_id, dtype=torch.long, device=dev)
        self.rows = torch.arange(B, device=dev)
        # for keeping the likeliest candidate: each row's summed log-probability of the tokens it chose, and their count
        self.score = sampling.drawn > 1 and sampling.choose == "likeliest"
        self.logp = torch.zeros(B, dtype=torch.float32, device=dev)
        self.n = torch.zeros(B, dtype=torch.float32, device=dev)

    def _step(self) -> None:
        u_t = self.u.index_select(1, self.t).squeeze(1)
        masked = self.g.mask(self.logits)
        tok = sample(masked, u_t, self.sampling)
        if self.score:  # the model's own probability (temperature 1, the grammar's tokens), not the sampler's
            # Only steps with a choice count: a token the grammar forces (the Bar that opens the continuation, the
            # TimeSig after each Bar, the budget's closing path) has probability 1 and would pull sparse bars, whose
            # tokens are mostly forced, towards the top.
            free = ~self.g.done & (torch.isfinite(masked).sum(dim=-1) > 1)
            lp = torch.log_softmax(masked, dim=-1).gather(1, tok[:, None]).squeeze(1)
            self.logp.add_(torch.where(free, lp, 0.0))
            self.n.add_(free.float())
        self.out.index_put_((self.rows, self.t.expand_as(self.rows)), tok)
        self.g.update(tok)
        if self.fast is not None:  # updates self.state in place
            self.logits.copy_(self.fast(tok, self.state)[:, : self.V])
        else:
            logits, new_state = self.model.step(tok, self.state)
            self.logits.copy_(logits[:, : self.V].float())
            self.state.copy_(new_state)
        self.t.add_(1)


def generate(model, grammar: RemiGrammar, window_tokens: list[int], start: GrammarState, *, bars: int,
             num_samples: int, max_new_tokens: int, sampling: SamplingConfig, seed: int,
             cuda_graph: bool = False, compile_step: bool = False, fast_step: bool = True,
             check_every: int | None = None, progress: Progress | None = None,
             tokenizer: REMI | None = None) -> list[list[int]]:
    """The continuations of `generate_kept`, without which candidate each is."""
    return generate_kept(model, grammar, window_tokens, start, bars=bars, num_samples=num_samples,
                         max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, cuda_graph=cuda_graph,
                         compile_step=compile_step, fast_step=fast_step, check_every=check_every, progress=progress,
                         tokenizer=tokenizer)[0]


def generate_kept(model, grammar: RemiGrammar, window_tokens: list[int], start: GrammarState, *, bars: int,
                  num_samples: int, max_new_tokens: int, sampling: SamplingConfig, seed: int,
                  cuda_graph: bool = False, compile_step: bool = False, fast_step: bool = True,
                  check_every: int | None = None, progress: Progress | None = None,
                  tokenizer: REMI | None = None) -> tuple[list[list[int]], list[int] | None]:
    """Continuations of one prompt window, sample k drawn from seed + k. Returns token ids per sample
    (without the Bar that ended it) and, with candidates, the candidate each sample kept (else None). The model
    runs in its own dtype; sampling is always float32.

    With C = `sampling.drawn` > 1 candidates, each sample is one of its C continuations, decoded together by
    `generate_candidates`: the likeliest, or with `sampling.choose` "consensus" the one nearest to the others
    by the music metrics (which decodes them, so it needs `tokenizer`). Ties go to the lower candidate, so
    candidate 0, the plain sample, wins them.

    `progress(tokens, bars)`, if given, hears at every completion check (every step on CPU, every 16 on CUDA)
    the decode steps run and the bars each sample has finished.

    `fast_step` runs the prefill and the model step as the fused CUDA kernels of `FastStep` where they can run
    (CUDA, head size 64); `compile_step` decodes with the compiled readable step instead. Elsewhere, or False,
    the readable model does both."""
    C = sampling.drawn
    if C > 1 and sampling.choose == "consensus" and tokenizer is None:  # before any decoding
        raise ValueError("choosing candidates by consensus decodes them: pass the tokenizer")
    if progress is not None and C > 1:  # a sample's bars: those of its slowest candidate
        report = progress

        def progress(steps: int, bars: list[int]) -> None:
            report(steps, [min(bars[c * num_samples + k] for c in range(C)) for k in range(num_samples)])
    rows, scores = generate_candidates(model, grammar, window_tokens, start, bars=bars, num_samples=num_samples,
                                       max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                       cuda_graph=cuda_graph, compile_step=compile_step, fast_step=fast_step,
                                       check_every=check_every, progress=progress)
    if C == 1:
        return rows, None
    if sampling.choose == "consensus":
        vocab = Vocab(tokenizer)
        meta = meta_tokens(start, vocab)
        feats = [continuation_metrics(meta, row, bars, tokenizer, vocab) for row in rows]
        best = [consensus_index(feats[k::num_samples]) for k in range(num_samples)]
    else:
        best = [max(range(C), key=lambda c, k=k: scores[c * num_samples + k]) for k in range(num_samples)]
    return [rows[c * num_samples + k] for k, c in enumerate(best)], best


@torch.no_grad()
def generate_candidates(model, grammar: RemiGrammar, window_tokens: list[int], start: GrammarState, *,
                        bars: int, num_samples: int, max_new_tokens: int, sampling: SamplingConfig, seed: int,
                        cuda_graph: bool = False, compile_step: bool = False, fast_step: bool = True,
                        check_every: int | None = None,
                        progress: Progress | None = None) -> tuple[list[list[int]], list[float] | None]:
    """Every candidate row, `sampling.drawn` per sample (row c * num_samples + k: candidate c of sample k,
    seeded by `candidate_seeds`), and where the likeliest is to be kept each row's score (else None): the mean
    log-probability of the tokens it chose where it had a choice (temperature 1, among the tokens the grammar
    allowed; the closing Bar included). `progress` hears the bars of every row. Otherwise as `generate`."""
    device = model.device
    C = sampling.drawn
    B = num_samples * C
    fast = fast_step_for(model) if fast_step else None
    logits, state = prefill(model, window_tokens, device, fast)
    bg = BatchedGrammar(grammar, start, B, bars, max_new_tokens, device)
    u = draw_uniforms(candidate_seeds(seed, num_samples, C), max_new_tokens, device)
    dec = _Decoder(model, bg, logits.expand(B, -1), state.expand(B), u, sampling, grammar.vocab_size,
                   grammar.pad_id, compile_step, None if compile_step else fast)
    every = check_every or (16 if device.type == "cuda" else 1)
    if cuda_graph and device.type == "cuda":
        _run_graph(dec, max_new_tokens, every, progress)
    else:
        for t in range(max_new_tokens):
            dec.step()
            if (t + 1) % every == 0:
                _report(dec, t + 1, progress)
                if bool(bg.done.all()):
                    break
    if not bool(bg.done.all()):  # cannot happen: the grammar closes every sample within the budget
        raise RuntimeError("a sample did not finish within its token budget")
    out = dec.out.cpu().tolist()
    rows = []
    for row in out:
        n, cut = 0, len(row)
        for i, t in enumerate(row):
            if grammar.cls[t] == BAR:
                n += 1
                if n == bars + 1:
                    cut = i
                    break
        rows.append(row[:cut])
    scores = (dec.logp / dec.n.clamp(min=1)).tolist() if dec.score else None
    return rows, scores


def meta_tokens(start: GrammarState, vocab: Vocab) -> list[int]:
    """The time signature and tempo in force where a continuation starts: the meta tokens it decodes alone with."""
    return [start.meter, start.tempo if start.tempo >= 0 else vocab.default_tempo]


def candidate_seeds(seed: int, num_samples: int, candidates: int) -> list[int]:
    """Seeds of the decoded rows: candidate 0 of sample k draws from seed + k (as with no candidates), candidate c
    from seed + k + c * 2**20, past any other sample's seed (at most MAX_SAMPLES of them; torch's CPU generator
    keeps only a seed's low 32 bits, so a larger stride would wrap)."""
    return [seed + k + (c << 20) for c in range(candidates) for k in range(num_samples)]


def fast_step_for(model) -> FastStep | None:
    """The fused decode step for `model`, or None where it cannot run (CPU silently; on CUDA with a warning)."""
    reason = unsupported_reason(model)
    if reason is None:
        return FastStep.for_model(model)
    if model.device.type == "cuda":
        # stack: here, generate_candidates, torch.no_grad's wrapper, generate, generate's caller
        warnings.warn(f"prefilling and decoding with the readable model: {reason}", stacklevel=5)
    return None


def _report(dec: _Decoder, steps: int, progress: Progress | None) -> None:
    if progress is not None:
        # The Bar that ends a sample is counted by the grammar but not part of it.
        progress(steps, dec.g.bars.clamp(max=dec.g.target).tolist())


def _run_graph(dec: _Decoder, max_new_tokens: int, every: int, progress: Progress | None = None) -> None:
    """Capture `dec.step` once (after warm-up steps on a side stream) and replay it."""
    # Warm-up runs real steps (they count), so kernels and allocator pools exist before capture.
    warm = min(3, max_new_tokens)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warm):
            dec.step()
    torch.cuda.current_stream().wait_stream(s)
    done = warm
    if done >= max_new_tokens or bool(dec.g.done.all()):
        return
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dec.step()  # recorded, not run
    while done < max_new_tokens:
        n = min(every, max_new_tokens - done)
        for _ in range(n):
            graph.replay()
        done += n
        _report(dec, done, progress)
        if bool(dec.g.done.all()):
            break


# ----------------------------------------------------------------------------------------------------------------
# The API


def complete(model, tokenizer: REMI, prompt, config: CompleteConfig | None = None,
             progress: Progress | None = None) -> Completion:
    """Continue `prompt` (MIDI path, bytes, symusic.Score, PianoScore, or a token id list) by `config.bars` bars.

    Returns the token ids and Scores of every sample. CompletionError for unusable prompts.
    """
    config = config or CompleteConfig()
    grammar = RemiGrammar(tokenizer)
    vocab = Vocab(tokenizer)
    check_vocab(model, tokenizer)
    ids = list(prompt) if isinstance(prompt, list) else tokenize_prompt(prompt, tokenizer)
    window = prompt_window(ids, tokenizer, config.context_bars, config.max_seq_len, config.first_bar)
    try:
        start = grammar.run(window.tokens, window.meta_len, strict=False)
        full = grammar.run(ids, 0, strict=False)
    except GrammarError as e:
        raise CompletionError(f"the prompt's tokens are not a REMI stream this grammar knows: {e}") from None
    if not grammar.next_class[start.state, BAR]:
        raise CompletionError("the prompt ends inside an event and cannot be continued")
    model.eval()
    conts: list[list[int]] = []
    kept: list[int | None] = []
    n = config.num_samples
    per_batch = max(1, config.max_batch // config.sampling.drawn)  # each candidate is a decoded row
    for first in range(0, n, per_batch):  # batches of at most max_batch rows; sample k: seed + k
        size = min(per_batch, n - first)

        def part(tokens: int, done: list[int], first: int = first, size: int = size) -> None:
            progress(tokens, [config.bars] * first + done + [0] * (n - first - size))  # bars of every sample

        rows, chosen = generate_kept(model, grammar, window.tokens, start, bars=config.bars, num_samples=size,
                                     max_new_tokens=config.budget, sampling=config.sampling,
                                     seed=config.seed + first, cuda_graph=config.cuda_graph,
                                     compile_step=config.compile_step, fast_step=config.fast_step,
                                     progress=part if progress is not None else None, tokenizer=tokenizer)
        conts += rows
        kept += chosen or [None] * size
    meta = meta_tokens(start, vocab)
    samples = []
    for k, cont in enumerate(conts):
        score = _split(tokenizer.decode([ids + cont]), full.bar_start + full.bar_len)
        window_score = _split(decode_window(window.tokens + cont, window.meta_len, tokenizer, vocab),
                              start.bar_start + start.bar_len)
        alone = decode_window(meta + cont, 2, tokenizer, vocab)
        samples.append(Sample(k, config.seed + k, cont, score, alone, window_score, full.bar_start + full.bar_len,
                              start.bar_start + start.bar_len, sum(1 for t in cont if t == grammar.bar_id),
                              kept[k]))
    return Completion(ids, window, samples, int(tokenizer.time_division))


def check_vocab(model, tokenizer: REMI) -> None:
    """The model must have an output row for every token of the tokenizer."""
    V = model.cfg.vocab_size
    if len(tokenizer.vocab) > V:
        raise CompletionError(f"checkpoint/tokenizer mismatch: the model has {V} tokens, the tokenizer "
                              f"{len(tokenizer.vocab)}")


def _split(score: symusic.Score, tick: int) -> symusic.Score:
    """The decoded piano track split at `tick` into tracks "prompt" and "continuation", and a marker
    "continuation" at `tick` (MIDI files drop empty tracks; the marker stays)."""
    out = symusic.Score(score.tpq)
    out.tempos = score.tempos
    out.time_signatures = score.time_signatures
    out.markers.append(symusic.TextMeta(tick, "continuation"))
    before = symusic.Track("prompt", 0, False)
    after = symusic.Track("continuation", 0, False)
    for tr in score.tracks:
        for n in tr.notes:
            (after if n.time >= tick else before).notes.append(n)
        for p in tr.pedals:
            (after if p.time >= tick else before).pedals.append(p)
    out.tracks.append(before)
    out.tracks.append(after)
    return out

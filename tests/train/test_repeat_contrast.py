"""fit --repeat-contrast: its loss terms are the forced choice's own scores, and a real run trains with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fit_testutil import TINY, metrics, musictrain, musictrain_here

from rwkv_music.model import RWKV7, RWKV7Config
from rwkv_music.remi.tokenizer import tokenizer_from_file
from rwkv_music.remi.windows import Vocab
from rwkv_music.shards import TOKENIZER, iter_samples
from rwkv_music.shards.dataset import collate, collate_packed, with_replay
from rwkv_music.train.eval_choice import score_continuations
from rwkv_music.train.fit import contrast_loss_sums

pytestmark = pytest.mark.usefixtures("one_thread")  # every test here on one thread (conftest.py)


def paired_samples(shards: Path, vocab: Vocab, with_impostor: int, without: int) -> list[dict]:
    """Training windows as the stream pairs them: `with_impostor` that have one, then `without` that do not."""
    have, lack = [], []
    for s in iter_samples(shards, "train"):
        d = with_replay({k: s[k] for k in ("tokens", "meta_len", "ctx_len", "completion_len")}, vocab)
        (have if "impostor" in d else lack).append(d)
        if len(have) >= with_impostor and len(lack) >= without:
            return have[:with_impostor] + lack[:without]
    raise AssertionError("too few windows")


@pytest.mark.parametrize("packed", [False, True])
def test_contrast_terms_are_the_forced_choice_scores(small_shards: Path, packed: bool):
    """The training term's per-window scores equal `musictrain eval`'s forced-choice scores of the same windows,
    padded or packed (state reset at each window)."""
    vocab = Vocab(tokenizer_from_file(small_shards / TOKENIZER))
    torch.manual_seed(0)
    model = RWKV7(RWKV7Config(vocab_size=len(vocab.kinds) - 1, n_layer=2, n_embd=64)).eval()
    samples = paired_samples(small_shards, vocab, 8, 4)
    samples = samples[::2] + samples[1::2]  # windows without an impostor between those with one
    with_pairs = [s for s in samples if "impostor" in s]
    batch = (collate_packed([samples[:6], samples[6:]], pack_len=1024, pairs=True) if packed
             else collate(samples, pairs=True))
    margin = 0.1
    with torch.no_grad():
        ce, hinge, leads = contrast_loss_sums(model, batch, torch.device("cpu"), amp=False, margin=margin)
    prefixes = [s["tokens"][: s["ctx_len"]].tolist() for s in samples]
    truth = score_continuations(model, prefixes, [s["tokens"][s["ctx_len"]:].tolist() for s in samples],
                                torch.device("cpu"))
    imp = score_continuations(model, [p for p, s in zip(prefixes, samples, strict=True) if "impostor" in s],
                              [s["impostor"][s["ctx_len"]:].tolist() for s in with_pairs], torch.device("cpu"))
    lead = truth[["impostor" in s for s in samples]] - imp
    n_comp = np.array([s["completion_len"] for s in samples])
    assert ce.item() == pytest.approx(-(truth * n_comp).sum(), rel=1e-4)
    assert hinge.item() == pytest.approx(np.maximum(0.0, margin - lead).sum(), rel=1e-4, abs=1e-5)
    assert leads.item() == int((lead > 0).sum())
    assert batch["n_targets"] == n_comp.sum() and len(batch["pairs"]) == len(with_pairs)


def test_fit_with_repeat_contrast_logs_the_term_and_keeps_it_on_resume(small_shards: Path, tmp_path: Path):
    run = tmp_path / "run"
    args = (*TINY, "--batch-tokens", "512", "--pack-len", "256", "--max-steps", "6", "--log-every", "1",
            "--eval-every", "3", "--eval-batches", "2", "--save-every", "3", "--repeat-contrast", "1")
    musictrain("fit", small_shards, "-o", run, *args)
    recs = metrics(run)
    assert [r["step"] for r in recs] == list(range(1, 7))
    leads = [r["truth_leads_repeat"] for r in recs if "truth_leads_repeat" in r]
    assert len(leads) >= 4 and all(0 <= x <= 1 for x in leads)
    assert all(r["repeat_contrast"] >= 0 and np.isfinite(r["loss"]) for r in recs if "repeat_contrast" in r)
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["repeat_contrast"] == 1 and saved["repeat_margin"] == 0.1
    # the pairs change what a batch holds, so a resumed run may not turn them off; their weight may change
    res = musictrain_here("fit", small_shards, "-o", run, *args[:-1], "0", "--max-steps", "8", "--resume")
    assert res.exit_code == 2 and "cannot turn --repeat-contrast off" in res.output, res.output
    res = musictrain_here("fit", small_shards, "-o", run, *args[:-1], "0.5", "--max-steps", "8", "--resume")
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in metrics(run)] == list(range(1, 9))
    assert json.loads((run / "config.json").read_text())["train"]["repeat_contrast"] == 0.5

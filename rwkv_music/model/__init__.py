"""RWKV-7 (x070) model: config, blocks, WKV operator, recurrent state, checkpoints.

Knows nothing of MIDI: it maps token ids to logits.
"""

from rwkv_music.model.checkpoint import (
    config_from_rwkv_lm,
    load,
    load_rwkv_lm,
    read_meta,
    resize_vocab,
    save,
    save_rwkv_lm,
)
from rwkv_music.model.config import PRESETS, RWKV7Config, from_preset
from rwkv_music.model.rwkv7 import RWKV7, Block, ChannelMix, TimeMix
from rwkv_music.model.state import RWKV7State
from rwkv_music.model.wkv import wkv, wkv_chunked, wkv_reference, wkv_step

__all__ = [
    "PRESETS",
    "RWKV7",
    "Block",
    "ChannelMix",
    "RWKV7Config",
    "RWKV7State",
    "TimeMix",
    "config_from_rwkv_lm",
    "from_preset",
    "load",
    "load_rwkv_lm",
    "read_meta",
    "resize_vocab",
    "save",
    "save_rwkv_lm",
    "wkv",
    "wkv_chunked",
    "wkv_reference",
    "wkv_step",
]

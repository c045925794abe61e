"""rwkv-music: MIDI corpora to training shards to an RWKV-7 piano-completion model."""

__version__ = "0.1.0"

"""The music-token layer under `pipeline` and `train`: what a REMI token means.

tokenizer (miditok REMI build/load/hash, the piano merge), windows (bar-aligned samples and prompts, token
classes via `Vocab`, decoding back to MIDI) and grammar (the REMI state machine that keeps generation
decodable). Submodules are imported explicitly: importing this package loads neither miditok nor torch.
"""

"""The core layer: Whisper facts both `converters/` and the harness build on, importing neither.

checkpoint (weights resolution), ct2_model_bin (CTranslate2's file format), audio (decoding and
the log-mel front end), decoding (Dims, Prompt, the one greedy loop), target (the Artifact,
Runner and Target contracts), status, hashing and errors (small shared helpers).
"""

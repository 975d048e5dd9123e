"""Converters turn a Whisper checkpoint into artifacts per target and quantization; each
target module also holds the runner that executes its artifact (see `protocol`)."""

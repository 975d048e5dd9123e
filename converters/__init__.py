"""Converters turn a Whisper checkpoint into artifacts per target and quantization; each target
module declares one `TARGET` (`harness.core.target.Target`), its runner included, and
`converters.registry` lists them."""

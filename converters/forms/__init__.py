"""Model forms shared by several targets: Whisper's blocks rebuilt for export, the KV-cached
step, the static cache, the Apple-Neural-Engine form."""

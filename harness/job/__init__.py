"""The job: its spec (frozen, validated once), the YAML file it comes from, validation helpers
and the gate's thresholds."""

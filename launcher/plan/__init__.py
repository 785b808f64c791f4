"""Planning: a validated spec expanded into runs:
methods, resources, memory, architectures, DeepSpeed configs and the pre-flight."""

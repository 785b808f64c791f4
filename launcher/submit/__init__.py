"""Submission: idempotent submit through a backend, the manifest, the status view and the live progress."""

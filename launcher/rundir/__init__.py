"""The run-directory contract: file names and atomic writes, status.json, run identity."""

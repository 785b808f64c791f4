"""The run-directory contract: file names and atomic writes, run.yaml (RunConfig), run identity,
status.json and the ds_config step counts. Imports nothing above itself but the spec's typed field
models (launcher.spec.schema)."""

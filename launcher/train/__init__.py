"""What every rank runs (``launcher train RUN_DIR``): reads run.yaml and ds_config.json, trains, evaluates,
exports. A rank imports the run directory, data, model, spec and builtins packages, never plan, submit,
backends or collect."""

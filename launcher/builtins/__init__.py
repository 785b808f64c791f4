"""The embedded default: the built-in tiny model, the bundled demo data and the local artefact cache."""

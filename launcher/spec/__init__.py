"""The job spec: its YAML schema, validation in the spec's own terms
(file:line:col), YAML with positions, overrides."""

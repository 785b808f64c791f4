"""The job spec: its YAML schema, validation in the spec's own terms (file:line:col), YAML with positions,
overrides, the dotted keys and the ZeRO/offload rules. Imports nothing above itself: what its checks
need from plan and data is handed in (launcher.plan.input_knowledge)."""

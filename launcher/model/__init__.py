"""Facts read off a loaded (or meta-device) model: what both the planner and the ranks need."""

"""Training data as both the pre-flight and the ranks read it: file kinds, record formats, chat templates."""

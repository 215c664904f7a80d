"""Tasks: a dataset reader, a head and a metric each."""

"""Settings: one source for the command line, YAML files and the Python API."""

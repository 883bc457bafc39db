"""Configuration: options declared once (options.py), the typed config tree (schema.py), and the upstream formats read into it (compat/)."""

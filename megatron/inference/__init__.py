"""Out of training: load any checkpoint from its stored config, generate text, serve it."""

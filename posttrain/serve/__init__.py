"""Serving trained models: generation and the interactive chat REPL."""

"""Models: sources (local, hub, built-in), fine-tuning methods, heads, export."""

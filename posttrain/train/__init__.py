"""Training: the shared loop and one module per stage (config -> data -> model -> loop)."""

"""Data layer: records, file formats, validation, tokenized datasets, batching."""

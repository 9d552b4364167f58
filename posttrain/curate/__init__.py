"""Data construction commands (`posttrain data ...`): validate, convert, from-task, synth, dedup, filter, etc.

Each command streams rows (`stream.iter_rows`), writes atomically (`stream.AtomicJsonl`) and
writes every row it does not keep to a side file with the reason, so nothing is dropped silently.
"""

"""Evaluation: perplexity, multiple-choice benchmarks, generation metrics, judges, ratings, reports."""

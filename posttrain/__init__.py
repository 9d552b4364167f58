"""posttrain: post-training toolkit for large language models."""

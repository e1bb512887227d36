"""Evaluation: refusal (substring, logit score), damage (KL), generation-based rates."""

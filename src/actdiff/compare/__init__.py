"""Comparison and diagnosis: alignment, divergence statistics, teacher forcing, routing, hypotheses."""

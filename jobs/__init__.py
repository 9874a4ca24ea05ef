"""Compute-side entry points: each stage's job runs one of these modules' ``run`` functions."""

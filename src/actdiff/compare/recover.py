"""Least-squares recovery of linear parameters (stub; the real module is written on another branch)."""

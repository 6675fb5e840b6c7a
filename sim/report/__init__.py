"""Figures and reports (matplotlib), at the edge: the core never plots."""

"""Canonicalization: constant folding, BatchNorm folding, no-op and dead-code removal."""

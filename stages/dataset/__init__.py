"""The download and preprocess stages' parts: the IDX format, one attempt at one mirror, the per-node cache."""

"""Weight pruning: unstructured (magnitude), semi-structured (N:M) and structured (channels)."""

"""From run directories to the published set: aggregate, claims (T3), figure helpers, manifest, verify. Torch-free at import."""

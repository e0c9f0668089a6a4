"""One run: its config, its run directory, the probes, the loop (and stacked seeds)."""

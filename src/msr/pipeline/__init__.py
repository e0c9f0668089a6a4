"""What the Snakemake workflow asks of the library: the grid of runs and the checks a schema cannot make."""

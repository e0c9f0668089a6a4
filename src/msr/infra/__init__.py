"""Tools around training: the benchmark, the fork server, GPU slot claims."""

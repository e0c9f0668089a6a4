"""msr: a reproducible replication of Mean Shift Rejection (Ruff, Beck, Bach, arXiv:1911.13173)."""

__version__ = "0.1.0"

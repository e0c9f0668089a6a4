#!/usr/bin/env bash
# Run by Snakemake inside the freshly created conda env (--sdm conda), from the working
# directory (the repository root): install this checkout's msr without touching the
# conda-managed dependencies.
set -euo pipefail
python -m pip install --no-deps --no-build-isolation -e .

"""One DDP training process: ``accelerate launch ... kiln/ddp/worker.py SPEC.json``.

Run as a file so that it works where the package is not installed (a Snakemake conda env): the
folder that holds the kiln package goes on sys.path.
"""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # scripts/, after the standard library

from kiln.launch import run_worker  # noqa: E402

if __name__ == "__main__":
    run_worker(sys.argv[1])

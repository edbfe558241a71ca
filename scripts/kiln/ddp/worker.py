"""One DDP training process: ``accelerate launch ... kiln/ddp/worker.py SPEC.json``.

Run as a file, not ``-m kiln.train``: scripts/ must not come first on sys.path (its tokenize.py
and trace.py would shadow the standard library's), and this folder holds nothing that can.
"""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2]))  # scripts/, after the standard library

from kiln.train import run_worker  # noqa: E402

if __name__ == "__main__":
    run_worker(sys.argv[1])

"""Data-parallel training: the file `accelerate launch` runs in each process (worker.py)."""

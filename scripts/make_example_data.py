"""Write the shipped examples' data (config/examples/data/) from this Python's standard library."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kiln.examples import write_example_data  # noqa: E402

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "config" / "examples" / "data"
    print(write_example_data(out))

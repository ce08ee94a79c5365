"""Write the compact train_gpt.py for a record folder.

The code's bytes count against the 16,000,000-byte cap, so a record ships train_gpt.py minified
(python-minifier: docstrings, annotations outside classes and long names go; the program is the same),
compressed with ZPAQ and held in a latin-1 string literal of a four-line file that decompresses it and
execs it under the name train_gpt.py; its second line names the sha256 of the readable source. The
format is train_gpt.compact_code, which train_gpt.py also uses to log the shipped size of its own code
(bytes_code) whichever form runs. The compact file runs the same program as the readable one:
tests/test_compact.py runs both and compares them byte for byte. It needs the zpaq package to run
(requirements.txt); making it also needs python-minifier.

    python3 scripts/compact_train_gpt.py train_gpt.py records/track_10min_16mb/DATE_Name/train_gpt.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (python scripts/compact_train_gpt.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_gpt import compact_code  # noqa: E402


def write_compact(src_path: str | Path, dst_path: str | Path) -> int:
    """Write the compact version of src_path to dst_path; returns its size in bytes."""
    src_path, dst_path = Path(src_path), Path(dst_path)
    if not src_path.is_file():
        raise FileNotFoundError(f"{src_path}: no such source file")
    data = compact_code(src_path.read_bytes())
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    dst_path.write_bytes(data)
    return len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the readable train_gpt.py")
    parser.add_argument("dst", help="where to write the compact train_gpt.py")
    args = parser.parse_args()
    size = write_compact(args.src, args.dst)
    print(f"compact dst:{args.dst} bytes:{size} source_bytes:{Path(args.src).stat().st_size}")


if __name__ == "__main__":
    main()

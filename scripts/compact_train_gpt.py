"""Write a compact, self-extracting train_gpt.py for a record folder.

The code's bytes count against the 16,000,000-byte cap, so a record ships the readable train_gpt.py
compressed with brotli (quality 11: about 5% smaller than LZMA on this source, and train_gpt.py needs
brotli anyway), base85-encoded in a two-line wrapper that decompresses it and execs it under the name
train_gpt.py (tracebacks keep the readable line numbers). The format is train_gpt.compact_code, which
train_gpt.py also uses to log the shipped size of its own code (bytes_code) whichever form runs.
The wrapper runs exactly the readable source: tests/test_compact.py checks it byte for byte.

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


def compact_source(source: bytes) -> str:
    return compact_code(source)


def write_compact(src_path: str | Path, dst_path: str | Path) -> int:
    """Write the self-extracting version of src_path to dst_path; returns its size in bytes."""
    src_path, dst_path = Path(src_path), Path(dst_path)
    if not src_path.is_file():
        raise FileNotFoundError(f"{src_path}: no such source file")
    text = compact_code(src_path.read_bytes())
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    dst_path.write_text(text, encoding="ascii")
    return len(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the readable train_gpt.py")
    parser.add_argument("dst", help="where to write the compact train_gpt.py")
    args = parser.parse_args()
    size = write_compact(args.src, args.dst)
    print(f"compact dst:{args.dst} bytes:{size} source_bytes:{Path(args.src).stat().st_size}")


if __name__ == "__main__":
    main()

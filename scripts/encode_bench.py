"""Time text -> ids on hostile and ordinary texts of 100k and 1M characters: harmony's encoder called directly
(`--harmony`) or ossscope's bounded, chunked `encode_text` (the default).

    python scripts/encode_bench.py            # ossscope.encode.encode_text
    python scripts/encode_bench.py --harmony  # openai-harmony's encode, whole (panics on some; skips 1M "X")
"""

from __future__ import annotations

import argparse
import base64
import os
import time
from pathlib import Path

from ossscope import tokenizer as tk
from ossscope.encode import encode_text


def texts(n: int) -> dict[str, str]:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return {
        "base64 of random bytes": base64.b64encode(os.urandom(n)).decode()[:n],
        "base64 of zeros (AAAA)": base64.b64encode(bytes(n)).decode()[:n],
        "X repeated": "X" * n,
        "prose (README)": (readme * (n // len(readme) + 1))[:n],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harmony", action="store_true", help="call harmony's encoder directly")
    args = parser.parse_args()
    enc = tk.harmony_encoding()
    enc.encode("warm up", allowed_special=set())
    for n in (100_000, 1_000_000):
        for name, text in texts(n).items():
            if args.harmony and name == "X repeated" and n == 1_000_000:
                print(f"{n:>9,} {name:<24} skipped (quadratic: 200k took ~16 s)")
                continue
            started = time.perf_counter()
            try:
                if args.harmony:
                    ids = enc.encode(text, allowed_special=set(), disallowed_special=())
                else:
                    ids = encode_text(enc, text)
                outcome = f"{len(ids):>8,} ids"
            except BaseException as exc:  # noqa: BLE001 - harmony's panics are BaseExceptions
                outcome = type(exc).__name__
            print(f"{n:>9,} {name:<24} {outcome:<18} {time.perf_counter() - started:7.3f} s", flush=True)


if __name__ == "__main__":
    main()

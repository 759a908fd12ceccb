"""A tiny boostserve client: classify PNG files, optionally with a per-request budget.

Only the standard library, so it runs anywhere:

    python examples/client.py examples/images/*.png
    python examples/client.py --max-accuracy-drop 0.005 examples/images/00002_trouser.png
    python examples/client.py --budget-macs 2e6 --url http://127.0.0.1:8000 examples/images/*.png
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path


def classify(url: str, image: Path, budget: dict[str, str]) -> dict[str, object]:
    """POST the raw PNG bytes; budget knobs travel as query parameters."""
    query = f"?{urllib.parse.urlencode(budget)}" if budget else ""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/classify{query}",
        data=image.read_bytes(),
        headers={"Content-Type": "image/png"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, help="PNG/JPEG files to classify")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    knobs = parser.add_mutually_exclusive_group()
    knobs.add_argument("--budget-macs", help="average MACs per image to aim for, e.g. 2e6")
    knobs.add_argument("--max-accuracy-drop", help="accepted accuracy loss vs the full network, e.g. 0.01")
    knobs.add_argument("--max-exit", help="never run past this exit (1-based)")
    parser.add_argument("--all-stages", action="store_true", help="disable early exit (A/B comparison)")
    args = parser.parse_args()

    budget = {
        key: value
        for key, value in {
            "budget_macs": args.budget_macs,
            "max_accuracy_drop": args.max_accuracy_drop,
            "max_exit": args.max_exit,
        }.items()
        if value is not None
    }
    if args.all_stages:
        budget["early_exit"] = "false"
    for path in args.images:
        try:
            body = classify(args.url, path, budget)
        except urllib.error.HTTPError as exc:
            print(f"{path}: HTTP {exc.code} {exc.read().decode(errors='replace')}", file=sys.stderr)
            return 1
        except urllib.error.URLError as exc:  # refused, unknown host, ...: the server, not the image
            print(f"cannot reach {args.url}: {exc.reason}", file=sys.stderr)
            return 1
        except OSError as exc:  # the image file (missing, unreadable) or a timeout mid-answer
            print(f"{path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        result = body["results"][0]  # type: ignore[index]
        print(
            f"{path.name:28s} {result['class_name']:12s} p={result['confidence']:.3f} "
            f"exit {result['exit']}/{result['exits_total']} "
            f"MACs {result['macs'] / 1e6:.2f}M ({100 * result['macs_fraction']:.0f}% of full)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Check an OpenAI-compatible server before a run uses it (the seed's test_vllm.py).

    python tools/check_endpoint.py http://127.0.0.1:8901 [--model NAME] [--api-key-env VLLM_API_KEY]

Lists the models it serves and sends one chat completion. Exit 0 when both work; otherwise one
line saying why (refused connection, wrong API key, unknown model, an error answer) and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jobs.generation.openai_client import EndpointError, check_endpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/check_endpoint.py", description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8901 (with or without /v1)")
    parser.add_argument("--model", help="the model name to check (default: the one model it serves)")
    parser.add_argument(
        "--api-key-env", default="VLLM_API_KEY", help="environment variable holding the API key (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        endpoint, models, reply = check_endpoint(args.url, os.environ.get(args.api_key_env), args.model)
    except EndpointError as error:
        print(f"check_endpoint: {error}", file=sys.stderr)
        return 1
    print(f"{endpoint.base_url}: serves {', '.join(models)}")
    print(f"{endpoint.model} answered in {time.monotonic() - started:.1f} s: {reply!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

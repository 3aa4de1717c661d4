"""The I/O limit: every page of every resource fetched raw, the four resources in parallel.

One thread per resource, each with its own ``requests.Session``, pages read one after the other
by offset (limit 100) until the API's ``total`` is reached, every body parsed with ``orjson``.
Nothing is validated or stored: this is the floor a sync of the same pages cannot beat with one
request in flight per resource.

Usage: ``python bench/io_limit.py BASE_URL`` (the API key comes from ``CRM_API_KEY``). Prints one
JSON line: records and requests per resource.
"""

import json
import os
import sys
import threading

import orjson
import requests

RESOURCES = ("notes", "deals", "accounts", "calls")
PAGE_SIZE = 100


def fetch_all(base_url: str, api_key: str, resource: str, out: dict[str, tuple[int, int]]) -> None:
    session = requests.Session()
    session.trust_env = False
    offset, records, requests_made = 0, 0, 0
    while True:
        response = session.get(
            f"{base_url}/v1/{resource}",
            params={"api_key": api_key, "offset": offset, "limit": PAGE_SIZE},
            timeout=30,
        )
        requests_made += 1
        response.raise_for_status()
        body = orjson.loads(response.content)
        page = body["data"]
        records += len(page)
        offset += PAGE_SIZE
        if not page or offset >= body["total"]:
            break
    out[resource] = (records, requests_made)


def main() -> int:
    base_url = sys.argv[1].rstrip("/")
    api_key = os.environ["CRM_API_KEY"]
    out: dict[str, tuple[int, int]] = {}
    threads = [
        threading.Thread(target=fetch_all, args=(base_url, api_key, name, out))
        for name in RESOURCES
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(out) != len(RESOURCES):
        print("a fetch thread failed", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "records": sum(r for r, _ in out.values()),
                "requests": sum(n for _, n in out.values()),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

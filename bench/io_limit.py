"""The I/O limit: every page of every resource fetched raw, the four resources in parallel.

One thread per resource, each with its own ``requests.Session``, pages read one after the other
by offset (limit 100) until the API's ``total`` is reached, every body parsed with ``orjson``.
Nothing is validated or stored: this is the floor for a sync of the same pages with one request
in flight per resource.

``--per-resource N`` (default 1) reads the pages after the first one with N requests in flight
per resource (the first page tells the total): what concurrent page fetches within a resource
could reach. The benchmark's ``limit`` is N = 1.

Usage: ``python bench/io_limit.py BASE_URL [--per-resource N]`` (the API key comes from
``CRM_API_KEY``). Prints one JSON line: records and requests.
"""

import argparse
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import orjson
import requests

RESOURCES = ("notes", "deals", "accounts", "calls")
PAGE_SIZE = 100


def fetch_page(
    session: requests.Session, url: str, api_key: str, offset: int
) -> tuple[list[object], int]:
    response = session.get(
        url, params={"api_key": api_key, "offset": offset, "limit": PAGE_SIZE}, timeout=30
    )
    response.raise_for_status()
    body = orjson.loads(response.content)
    return body["data"], body["total"]


def fetch_all(
    base_url: str, api_key: str, resource: str, per_resource: int, out: dict[str, tuple[int, int]]
) -> None:
    url = f"{base_url}/v1/{resource}"
    local = threading.local()

    def session() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.trust_env = False
        return local.session

    page, total = fetch_page(session(), url, api_key, 0)
    records, requests_made = len(page), 1
    offsets = range(PAGE_SIZE, total, PAGE_SIZE)
    if per_resource <= 1:
        for offset in offsets:
            page, _ = fetch_page(session(), url, api_key, offset)
            records += len(page)
            requests_made += 1
    else:
        with ThreadPoolExecutor(per_resource) as pool:
            for page, _ in pool.map(lambda o: fetch_page(session(), url, api_key, o), offsets):
                records += len(page)
                requests_made += 1
    out[resource] = (records, requests_made)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url")
    parser.add_argument("--per-resource", type=int, default=1, help="requests in flight")
    args = parser.parse_args()
    base_url = args.base_url.rstrip("/")
    api_key = os.environ["CRM_API_KEY"]
    out: dict[str, tuple[int, int]] = {}
    threads = [
        threading.Thread(target=fetch_all, args=(base_url, api_key, name, args.per_resource, out))
        for name in RESOURCES
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(out) != len(RESOURCES):
        print("a fetch thread failed", file=sys.stderr)
        return 1
    records = sum(r for r, _ in out.values())
    print(json.dumps({"records": records, "requests": sum(n for _, n in out.values())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

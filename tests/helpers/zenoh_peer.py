"""A plain Zenoh peer for the bridge tests: publish the samples described on argv, then leave.

``python zenoh_peer.py CONNECT-ENDPOINT JSON``: JSON is a list of
``{"key", "payload" (hex), "attachment" (hex or null), "kind" ("put" or
"delete")}``, sent in order from one session after its first key's
publisher matches a subscriber (a deadline of 20 s, then exit 1).  Prints
``sent N`` and exits 0 once every sample is handed to Zenoh and the session
is closed.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import zenoh


def untyped(entity: object) -> Any:
    """The stubs leave undeclare() and close() untyped."""
    return entity


def matched(pub: zenoh.Publisher) -> bool:
    """Whether a subscriber matches (the stub says bool; it is a MatchingStatus)."""
    status: Any = pub.matching_status
    return bool(status.matching)


def main(argv: list[str]) -> int:
    endpoint, spec = argv[1], json.loads(argv[2])
    conf = zenoh.Config()
    conf.insert_json5("mode", '"peer"')
    conf.insert_json5("connect/endpoints", json.dumps([endpoint]))
    conf.insert_json5("scouting/multicast/enabled", "false")
    conf.insert_json5("scouting/gossip/enabled", "false")
    conf.insert_json5("transport/shared_memory/enabled", "false")
    session = zenoh.open(conf)
    block = zenoh.CongestionControl.BLOCK
    pubs: dict[str, zenoh.Publisher] = {}
    for s in spec:
        if s["key"] not in pubs:
            pubs[s["key"]] = session.declare_publisher(s["key"], congestion_control=block)
    first = pubs[spec[0]["key"]]
    deadline = time.monotonic() + 20
    while not matched(first):
        if time.monotonic() > deadline:
            print("no subscriber matched", flush=True)
            return 1
        time.sleep(0.01)  # a poll with a deadline: Zenoh's matching has no fd to wait on
    for s in spec:
        att = bytes.fromhex(s["attachment"]) if s["attachment"] is not None else None
        if s["kind"] == "delete":
            pubs[s["key"]].delete(attachment=att)
        else:
            pubs[s["key"]].put(bytes.fromhex(s["payload"]), attachment=att)
    for p in pubs.values():
        untyped(p).undeclare()
    untyped(session).close()
    print(f"sent {len(spec)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""A hub in its own process for the crash tests (not a test module).

``python -m tests.crash_hub CONFIG PLAN`` starts CloudHubService on CONFIG, submits the
messages of the JSON file PLAN (a list of [node_id, wire message]) unless PLAN is "-",
waits until they are durable, then prints ``ACCEPTED``; it prints ``PORTS <https> <ws>`` once
listening. It runs until killed.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from cloudhub import wire
from cloudhub.config import load_config
from cloudhub.service import CloudHubService


@inlineCallbacks
def main(config_path: str, plan_path: str):
    hub = CloudHubService(load_config(config_path), reactor=reactor, interpreter_tuning=True)
    hub.startService()
    # SIGTERM/SIGINT stop the reactor; stop the hub first, as twistd does.
    reactor.addSystemEventTrigger("before", "shutdown", hub.stopService)
    yield hub.ready
    print(f"PORTS {hub.port('https')} {hub.port('websocket')}", flush=True)
    if plan_path != "-":
        with open(plan_path, encoding="utf-8") as f:
            plan = json.load(f)
        for node_id, text in plan:
            hub.upstream.send(node_id, wire.decode(text.encode())).addErrback(lambda f: None)
        yield hub.upstream.flush()
        print("ACCEPTED", flush=True)


if __name__ == "__main__":
    reactor.callWhenRunning(main, sys.argv[1], sys.argv[2])
    reactor.run()

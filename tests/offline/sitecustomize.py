"""Cuts a test's `treesynth` process off the network: Python imports this
module at start-up when tests/offline is on PYTHONPATH (helpers_proc.offline_env).
Any attempt to connect or resolve a name raises OSError and leaves a line in
the file named by TREESYNTH_TEST_NETWORK_LOG, so an attempt the program
caught and survived is still seen by the test."""

import os
import socket


def _no_network(*args, **kwargs):
    log = os.environ.get("TREESYNTH_TEST_NETWORK_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(f"network access attempted: {args!r}\n")
    raise OSError("network access attempted during a treesynth run")


socket.socket.connect = _no_network
socket.socket.connect_ex = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network

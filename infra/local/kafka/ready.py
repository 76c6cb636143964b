#!/usr/bin/env python3
"""Fast Kafka readiness probe for infra/local/up (stdlib only, ~20 ms).

A TCP connect is not enough: the broker accepts connections before it has registered with
the KRaft controller and can serve clients. This sends one real Kafka Metadata request
(v4, the oldest version Kafka 4.x still speaks) and succeeds only when the answer lists at
least one live broker. Starting a JVM for kafka's own TopicCommand costs ~2-3 s, too slow
for the warm `up` path; `up` still runs TopicCommand once after a fresh start.

usage: ready.py HOST PORT [MIN_BROKERS]   -> exit 0 when ready, 1 otherwise (reason on stderr)
MIN_BROKERS (default 1): live brokers the answer must list (a three-broker stack waits until
the node sees the whole cluster).
"""
import socket
import struct
import sys


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf += chunk
    return buf


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    min_brokers = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    client_id = b"weir-ready"
    # Request header v1: api_key=3 (Metadata), api_version=4, correlation_id, client_id.
    header = struct.pack(">hhih", 3, 4, 7, len(client_id)) + client_id
    # Metadata v4 body: topics = null (-1, i.e. all), allow_auto_topic_creation = false.
    body = struct.pack(">ib", -1, 0)
    msg = header + body
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.settimeout(2)
        sock.sendall(struct.pack(">i", len(msg)) + msg)
        (size,) = struct.unpack(">i", read_exact(sock, 4))
        resp = read_exact(sock, size)
    correlation_id, _throttle_ms, n_brokers = struct.unpack(">iii", resp[:12])
    if correlation_id != 7:
        raise RuntimeError(f"unexpected correlation id {correlation_id}")
    if n_brokers < 1:
        raise RuntimeError("broker up but no live brokers in metadata yet")
    if n_brokers < min_brokers:
        raise RuntimeError(f"{n_brokers} of {min_brokers} brokers live in metadata")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # any failure just means "not ready yet"
        print(f"kafka not ready: {e}", file=sys.stderr)
        sys.exit(1)

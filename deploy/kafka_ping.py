#!/usr/bin/env python3
"""Waits until a Kafka-protocol broker answers a Metadata request.

usage: kafka_ping.py HOST:PORT [TIMEOUT_SECONDS]

Exits 0 once the broker answers with a well-formed Metadata (v0) response, 1 at the deadline.
Standard library only, so it works on a fresh machine (Debian's kcat cannot parse Tansu's
ApiVersions reply)."""
import socket
import struct
import sys
import time


def metadata_request(correlation_id: int) -> bytes:
    client_id = b"touchline-ping"
    # api_key=3 (Metadata), api_version=0, correlation id, client id, topics: empty array (all).
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    return struct.pack(">i", len(body)) + body


def read_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def ping(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.settimeout(2)
        sock.sendall(metadata_request(7))
        (size,) = struct.unpack(">i", read_exact(sock, 4))
        response = read_exact(sock, size)
        (correlation_id, brokers) = struct.unpack(">ii", response[:8])
        return correlation_id == 7 and brokers >= 1


def main() -> int:
    host, port = sys.argv[1].rsplit(":", 1)
    deadline = time.monotonic() + (float(sys.argv[2]) if len(sys.argv) > 2 else 60.0)
    while time.monotonic() < deadline:
        try:
            if ping(host, int(port)):
                return 0
        except (OSError, ConnectionError, struct.error):
            pass
        time.sleep(0.2)
    return 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Interop with gRPC's C core (Python grpcio): Set, Get, Delete and the error statuses through
a client nobody here wrote, with the messages encoded by hand (no generated stubs needed).
Usage: interop_grpcio.py HOST:PORT. Exit status 0 when every call behaved."""

import sys

import grpc
from pbwire import field


def main():
    channel = grpc.insecure_channel(sys.argv[1])
    grpc.channel_ready_future(channel).result(timeout=10)
    ident = lambda b: b  # noqa: E731 (messages are bytes already)

    def call(method, body):
        return channel.unary_unary(f"/pb.CacheService/{method}", request_serializer=ident,
                                   response_deserializer=ident)(body, timeout=5)

    value = b"\x00\x01binary\xff" * 100
    call("Set", field(1, b"interop") + field(4, value))  # SetRequest{key, value_bytes}
    got = call("Get", field(1, b"interop"))
    assert value in got, got
    for i in range(200):  # many calls on one HTTP/2 connection, C core's flow control
        call("Set", field(1, b"k%d" % i) + field(2, b"v%d" % i))
        assert b"v%d" % i in call("Get", field(1, b"k%d" % i))
    call("Delete", field(1, b"interop"))
    for method, body, code in [
        ("Get", field(1, b"interop"), grpc.StatusCode.NOT_FOUND),
        ("Get", b"", grpc.StatusCode.INVALID_ARGUMENT),
        ("Set", field(2, b"no key"), grpc.StatusCode.INVALID_ARGUMENT),
        ("Set", field(1, b"k") + field(3, b"ttl is a varint"), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        try:
            call(method, body)
            raise AssertionError(f"{method} {body[:20]!r} succeeded, {code} expected")
        except grpc.RpcError as e:
            assert e.code() == code, (method, e.code(), e.details())
    print("grpcio interop: ok")


if __name__ == "__main__":
    main()

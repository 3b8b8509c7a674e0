"""Protocol-buffer wire encoding by hand, for the scripts here that speak gRPC without stubs."""


def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, data):
    """A length-delimited field (string, bytes, message)."""
    return varint(num << 3 | 2) + varint(len(data)) + data

"""A tiny key-value server for the pytest example: one request per connection on a unix socket.

    set KEY VALUE  -> ok
    get KEY        -> VALUE, or "none"
    count          -> the number of keys

It prints "ready" once it listens. Its state is in memory only, which is what applier resets.
"""

import socket
import sys

store: dict[str, str] = {}


def answer(line: str) -> str:
    words = line.split()
    if len(words) == 3 and words[0] == "set":
        store[words[1]] = words[2]
        return "ok"
    if len(words) == 2 and words[0] == "get":
        return store.get(words[1], "none")
    if words == ["count"]:
        return str(len(store))
    return "error"


def main(path: str) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn, conn.makefile("rw") as stream:
            request = stream.readline()
            stream.write(answer(request) + "\n")
            stream.flush()
        # the connection is closed before the next accept(): nothing of it outlives the request


if __name__ == "__main__":
    main(sys.argv[1])

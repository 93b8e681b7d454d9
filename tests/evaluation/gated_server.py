"""A real inference server behind a gate that answers only the first N completion requests, for the tests that
interrupt a generation run mid-way: the run is then mid-way by construction, on a machine of any speed.

    python tests/evaluation/gated_server.py --answer N -- SERVER COMMAND ... --port P ...

It starts SERVER COMMAND on another free port and listens on P itself (so generate.py, which filled in P,
talks to the gate). Health checks and the first N `POST .../completions` pass through; later completion
requests wait, unanswered, until the process ends. The gate exits when the server dies (as the server
itself would have, so generate.py sees the server exit), and stops the server when it gets SIGTERM.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str]) -> None:
    assert argv[0] == "--answer" and argv[2] == "--", argv
    answer, command = int(argv[1]), argv[3:]
    at = command.index("--port") + 1
    listen_port, server_port = int(command[at]), free_port()
    command[at] = str(server_port)
    server = subprocess.Popen(command)  # same process group: generate.py's stop signals both
    lock, answered = threading.Lock(), [0]

    class Gate(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.command == "POST" and self.path.endswith("/completions"):
                with lock:
                    answered[0] += 1
                    passes = answered[0] <= answer
                if not passes:
                    print(f"gate: holding completion request {answered[0]} (answering {answer})", flush=True)
                    while True:
                        time.sleep(3600)
            upstream = http.client.HTTPConnection("127.0.0.1", server_port, timeout=600)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            upstream.close()

        do_GET = do_POST = _forward

        def log_message(self, *args) -> None:
            pass

    gate = ThreadingHTTPServer(("127.0.0.1", listen_port), Gate)
    gate.daemon_threads = True

    def stop(signum, frame) -> None:
        server.terminate()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    threading.Thread(target=lambda: os._exit(server.wait() or 1), daemon=True).start()
    gate.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])

"""llama.cpp's server (llama-cpp-python) for crates/cli/tests/remote_llama_cpp.rs, on a port the OS
picks: the socket is bound here, before the model loads, and its port printed as the first line, so
no other process can take the port between its choice and the server's start (as it could when the
test chose a free port and the server bound it later).

Usage: python llama_cpp_server.py MODEL.gguf
"""

import os
import socket
import sys

import uvicorn
from llama_cpp.server.app import create_app
from llama_cpp.server.settings import ModelSettings, ServerSettings


def main() -> None:
    gguf = sys.argv[1]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    print(port, flush=True)
    # The test reads only that line: anything later goes to stderr, not to a closed pipe.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    app = create_app(
        server_settings=ServerSettings(host="127.0.0.1", port=port),
        model_settings=[ModelSettings(model=gguf, n_ctx=512, n_threads=2, verbose=False)],
    )
    # uvicorn listens on the bound socket once the app has started.
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()

"""A TVM RPC server serving from this process: ``python rpc_server.py PORT`` (127.0.0.1 only); a plain script (it
runs under an arm64 Python that has tvm but not edgelm), started by edgelm.bench.loopback.LoopbackRpc.

tvm.exec.rpc_server starts a helper interpreter (PopenWorker) by executing sys.executable again, which under
qemu-user without binfmt_misc (an aarch64 Python on this x86-64 machine) fails with "Exec format error"; its
listening loop, called here directly, forks instead, which qemu-user supports. On a real device the stock server
(`python -m tvm.exec.rpc_server`) is what a user runs.
"""
import multiprocessing
import socket
import sys

from tvm.rpc import server

multiprocessing.set_start_method("fork")
port = int(sys.argv[1])
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", port))
sock.listen(1)
print("ready", flush=True)
server._listen_loop(sock, port, "", None, None, None)

"""A rank ends while the job's store host is frozen for a few seconds: its watchdog thread is inside a store call.

Prints how long ``RankWatchdog.stop()`` took and whether the thread had ended when it returned, then exits
normally (the interpreter finalizes). ``--freeze`` seconds of SIGSTOP on the host, from just before ``stop()``
(0: for good); ``--stop-timeout`` replaces the watchdog's bound on the wait.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

HOST = """# watchdog_slow_store_host
import sys, time, torch.distributed as dist
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=True, wait_for_workers=False)
print("ready", flush=True)
time.sleep(120)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--freeze", type=float, default=3.0)
    parser.add_argument("--stop-timeout", type=float, default=None)
    args = parser.parse_args()
    from lightning_cp.launch import free_port

    port = free_port()
    host = subprocess.Popen(
        [sys.executable, "-c", HOST, str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert host.stdout is not None and host.stdout.readline().strip() == "ready"
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        from lightning_cp import watchdog as watchdog_module
        from lightning_cp.watchdog import HEARTBEAT_INTERVAL, RankWatchdog

        if args.stop_timeout is not None:
            watchdog_module._STOP_TIMEOUT = args.stop_timeout

        watchdog = RankWatchdog(1, peers=[0, 1], describe_rank=str, heartbeat_timeout=None).start()
        time.sleep(2 * HEARTBEAT_INTERVAL)
        os.kill(host.pid, signal.SIGSTOP)
        if args.freeze:  # a helper process thaws the host: this process is busy in stop() and then finalizing
            subprocess.Popen(["sh", "-c", f"sleep {args.freeze}; kill -CONT {host.pid}"])
        time.sleep(1.5 * HEARTBEAT_INTERVAL)  # the thread's next heartbeat is now waiting for the host
        started = time.monotonic()
        watchdog.stop()
        alive = watchdog._thread.is_alive()
        print(f"stop() took {time.monotonic() - started:.1f} s; thread alive after stop(): {alive}", flush=True)
    finally:
        if args.freeze:
            host.kill()
        else:  # ending it now would wake the thread in its call while this process finalizes: the caller ends it
            print(f"store host pid {host.pid}", flush=True)


if __name__ == "__main__":
    main()

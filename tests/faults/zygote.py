"""Fork server for the fault tests: import lesionkit once, then fork one fresh process per command.

A `lesionkit ...` start costs ~5 s of imports (much more on a loaded 2-core box); the kill -9 test alone
starts the trainer a dozen times. Here the imports are paid once: each request forks a child that runs
`lesionkit.cli.main(argv)` exactly as the console script does (own pid, own stdout/stderr file, exit code,
atexit handlers), so a SIGKILL, a resource limit or a crash hits a real, independent trainer process.
The server never runs torch code itself, so forking it is safe (one thread, no OpenMP pool yet).

Protocol (JSON lines): request {"argv", "log", "env", "cwd", "fsize_limit"} on stdin; the server answers
{"pid"} when the child runs and {"pid", "rc", "cpu_s"} when it ended (rc < 0: killed by signal -rc).
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import signal
import sys
import traceback

# the point of this process: import everything the commands need once, before forking (scipy and sklearn:
# lesionkit.metrics imports them inside the functions that score, and every child validates)
import scipy.optimize  # noqa: F401
import scipy.special  # noqa: F401
import scipy.stats  # noqa: F401
import sklearn.calibration  # noqa: F401
import sklearn.metrics  # noqa: F401

import lesionkit.cli
import lesionkit.evaluate
import lesionkit.predict
import lesionkit.train


def run_child(req: dict) -> None:
    """In the forked child: become a plain `lesionkit` process and never return."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(req["cwd"])
    for k, v in req.get("env", {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if req.get("fsize_limit"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize_limit"], req["fsize_limit"]))
    sys.argv = ["lesionkit", *req["argv"]]
    try:
        rc = lesionkit.cli.main(req["argv"])
    except SystemExit as e:  # as the interpreter handles it: an int is the exit code, a message is printed
        rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if rc == 1 and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001  (uncaught: traceback and exit 1, as the interpreter does)
        traceback.print_exc()
        rc = 1
    # An interpreter exit without the slow module teardown: atexit handlers (W&B's finish) and flushes.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            run_child(req)
        print(json.dumps({"pid": pid}), flush=True)
        _, status, usage = os.wait4(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        print(json.dumps({"pid": pid, "rc": rc, "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)


if __name__ == "__main__":
    main()

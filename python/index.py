"""EdgeFaaS runner: runs a function's handle(req), a fresh process per request.

    python3 index.py <dir>/handler.py          exec mode: one request, then exit
    python3 index.py --base                    fork mode: the base process (base())
    python3 index.py --check <dir>/handler.py  import the handler, report on fd 3

The request body arrives on stdin and reaches handle() as str (bytes that are
not UTF-8 survive as surrogates and are written back unchanged). What the
handler prints, then its return value as print() shows it, is the response.
A returned dict of statusCode/body/headers (the OpenFaaS python3-http shape)
also sets the status and headers.

How the run went goes to the daemon on a status pipe of its own (fd 3 in exec
mode; with each request in fork mode), never on stderr, which is only the
function's log. One line each:

    P <pid>       the child runs, as the leader of its own process group
    R <json>      handle() returned; {"statusCode":n,"headers":[[k,v],...]} or {}
    F <code>      handle() failed (an exception: 1, or sys.exit(code)); stderr says why
    X <status>    (from the zygote) the child exited with this wait status, and
                  whatever it left running in its group was killed

The child closes stdin, stdout and stderr before R or F, so the daemon has the
whole output when the line arrives and answers without waiting for the exit.
Exec mode imports nothing beyond os and sys; fork mode's imports happen once,
in the base. Works on Python 3.7 and later.
"""
import os
import sys

STATUS_FD = 3
# Largest request message (a request's environment; heads are at most 16 KiB).
REQUEST_MAX = 64 * 1024
RESPONSE_KEYS = {"statusCode", "body", "headers"}


def load(path):
    """Runs handler.py as module `handler` (its folder importable for helpers). Read
    and compiled directly: the import system's finders cost a millisecond here."""
    path = os.path.abspath(path)
    sys.path.insert(0, os.path.dirname(path))
    module = type(sys)("handler")
    module.__file__ = path
    sys.modules["handler"] = module
    with open(path, "rb") as source:
        code = compile(source.read(), path, "exec")
    exec(code, module.__dict__)
    return module


def read_request():
    chunks = []
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "surrogateescape")


def is_response(result):
    return isinstance(result, dict) and result and set(result) <= RESPONSE_KEYS


def encode_body(body):
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    import json  # only here: it costs a warm process over a megabyte to hold

    return json.dumps(body).encode("utf-8")


def json_string(text):
    """A JSON string literal (the runner avoids importing json for its own messages)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or ch == "\x7f" or "\ud800" <= ch <= "\udfff":
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def emit(result):
    """Writes the handler's result to stdout; returns the R line's JSON."""
    if is_response(result):
        sys.stdout.flush()
        sys.stdout.buffer.write(encode_body(result.get("body")))
        status = result.get("statusCode", 200)
        if isinstance(status, int) and not isinstance(status, bool):
            status = "%d" % status
        else:
            status = json_string(repr(status))  # the daemon answers 500 naming it
        headers = ",".join(
            "[%s,%s]" % (json_string(str(k)), json_string(str(v)))
            for k, v in (result.get("headers") or {}).items()
        )
        return '{"statusCode":%s,"headers":[%s]}' % (status, headers)
    if result is not None:
        print(result)
    return "{}"


def exit_code(exc):
    """The status sys.exit(x) gives, printing a message as the interpreter would."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    sys.stderr.write(str(exc.code) + "\n")
    return 1


def finish(status, line, code):
    """Closes the request's stdio, reports `line` on `status`, and exits."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    for fd in (0, 1, 2):
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.write(status, line.encode("utf-8", "surrogateescape") + b"\n")
    except OSError:
        pass
    os._exit(code)


def serve(module, status):
    """Runs one request on fds 0, 1 and 2, reports on `status`; never returns."""
    try:
        meta = emit(module.handle(read_request()))
        finish(status, "R " + meta, 0)
    except SystemExit as exc:
        code = exit_code(exc)
        finish(status, "R {}" if code == 0 else "F %d" % code, code)
    except BaseException:
        import traceback

        traceback.print_exc()
        finish(status, "F 1", 1)


def import_error(path, exc):
    """One line naming an import failure and the line of handler.py it came from."""
    if isinstance(exc, SyntaxError):
        return "%s: %s (line %s)" % (type(exc).__name__, exc.msg, exc.lineno)
    import traceback

    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(frame.filename) == os.path.abspath(path):
            line = frame.lineno
    text = "%s: %s" % (type(exc).__name__, exc)
    return text if line is None else "%s (line %d)" % (text, line)


def check(path, out):
    """Imports the handler in this throwaway process; writes `ok` or why not to `out`."""
    try:
        module = load(path)
        if not callable(getattr(module, "handle", None)):
            message = "handler.py defines no callable handle(req)"
        else:
            message = None
    except BaseException as exc:
        message = import_error(path, exc)
    os.write(out, b"ok" if message is None else ("fail " + message).encode("utf-8", "replace"))
    os._exit(0)


# Fork mode. The daemon starts one base process (`--base`), with the
# interpreter and this runner loaded, on a SOCK_SEQPACKET socket as its fd 0.
# Commands, each one message:
#   b"Z\0<handler path>" + fd   fork a zygote for that function; fd: its socket
#   b"C\0<handler path>" + fd   fork a throwaway child that imports it (check); fd: result pipe
# answered b"pid <pid>". A zygote imports the handler, says b"ready <pid>" (or
# b"fail <why>" and exits) on its socket, and keeps one spare child forked and
# blocked on that socket. The daemon sends each request to the socket: its
# environment as b"k\0v\0..." with four fds (stdin, stdout, stderr, status); the
# spare that receives it tells the zygote (which forks the next spare and keeps
# the status fd for the X line) and runs it. EOF on a socket ends its process.


def base():
    import gc
    import select
    import signal
    import socket

    ctl = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    rehearse()
    gc.freeze()
    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                drain(wake_r)
                while True:
                    try:
                        pid, _ = os.waitpid(-1, os.WNOHANG)
                    except ChildProcessError:
                        break
                    if pid == 0:
                        break
                continue
            data, fds = recv_fds(ctl, 1 << 16, 1)
            if not data:
                os._exit(0)
            kind, path = data.split(b"\0", 1)
            path = os.fsdecode(path)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                ctl.close()
                for own in (wake_r, wake_w):
                    os.close(own)
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                if kind == b"Z":
                    zygote(socket.socket(fileno=fds[0]), path)
                else:
                    check(path, fds[0])
                os._exit(1)
            for passed in fds:
                os.close(passed)
            ctl.send(b"pid %d" % pid)


def recv_fds(sock, size, maxfds, flags=0):
    """One message and the fds passed with it (socket.recv_fds is 3.9+)."""
    import socket

    data, ancillary, _, _ = sock.recvmsg(size, socket.CMSG_SPACE(maxfds * 4), flags)
    fds = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds.extend(int.from_bytes(payload[i:i + 4], sys.byteorder) for i in range(0, usable, 4))
    return data, fds


def send_fds(sock, data, fds):
    import socket

    rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])


def drain(fd):
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def zygote(requests, path):
    """A function's warm process: imports the handler once, then keeps a spare child."""
    import gc
    import select
    import signal
    import socket

    os.setpgid(0, 0)
    os.chdir(os.path.dirname(os.path.abspath(path)))
    try:
        module = load(path)
        if not callable(getattr(module, "handle", None)):
            raise AttributeError("handler.py defines no callable handle(req)")
    except BaseException as exc:
        requests.send(("fail " + import_error(path, exc)).encode("utf-8", "replace"))
        os._exit(1)
    if "random" in sys.modules:
        sys.modules["random"].seed()  # else every child would draw the zygote's numbers
    gc.freeze()  # objects from here on are shared with every child: keep the collector off them
    take, taken = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    running = {}  # child pid -> its request's status fd
    spares = set()
    own_fds = (taken.fileno(), wake_r, wake_w)

    def fork_spare():
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            # Other requests' status pipes stay the zygote's: their EOF means their child is gone.
            for fd in own_fds + tuple(running.values()):
                os.close(fd)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            spare(requests, take, module)
        spares.add(pid)

    def note_taken():
        while True:
            try:
                data, fds = recv_fds(taken, 64, 1, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if not data:
                return
            pid = int(data)
            spares.discard(pid)
            if fds:
                running[pid] = fds[0]
            if accepting:
                fork_spare()

    def reap():
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            if pid not in running:
                note_taken()  # a child says it was taken before it runs: its word is queued by now
            if pid in running:
                try:
                    os.killpg(pid, signal.SIGKILL)  # what the handler left running dies with it
                except OSError:
                    pass
            _, status = os.waitpid(pid, 0)
            fd = running.pop(pid, None)
            if fd is not None:
                try:
                    os.write(fd, b"X %d\n" % status)
                except OSError:
                    pass
                os.close(fd)
            elif pid in spares:
                spares.discard(pid)
                if accepting:
                    fork_spare()

    accepting = True
    requests.send(b"ready %d" % os.getpid())
    fork_spare()
    poller = select.poll()
    poller.register(requests, 0)  # hang-up only: the spares read the requests
    poller.register(taken, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while accepting or running:
        for fd, events in poller.poll():
            if fd == wake_r:
                drain(wake_r)
                reap()
            elif fd == taken.fileno():
                note_taken()
            elif events & (select.POLLHUP | select.POLLERR):
                # The daemon let go: spares see EOF and leave; finish the running ones.
                accepting = False
                poller.unregister(fd)
    os._exit(0)


def spare(requests, take, module):
    """A child forked ahead of its request: waits for it, then serves it."""
    try:
        data, fds = recv_fds(requests, REQUEST_MAX, 4)
    except OSError:
        os._exit(0)
    if not data or len(fds) != 4:
        os._exit(0)
    pid = os.getpid()
    os.setpgid(0, 0)
    status = fds[3]
    try:
        send_fds(take, b"%d" % pid, [status])
    except OSError:
        os._exit(0)  # the zygote is gone: leave the request unstarted, the daemon retries
    take.close()
    requests.close()
    os.write(status, b"P %d\n" % pid)
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
        os.close(fd)
    apply_env(data)
    serve(module, status)


def apply_env(data):
    """Sets the request's variables (b"k\0v\0...") in os.environ and the C environment."""
    fields = data.split(b"\0")
    for k, v in zip(fields[0::2], fields[1::2]):
        os.environ[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")


def rehearse():
    """Runs the request path many times in the base, on stand-ins, before any zygote
    is forked. Python 3.11+ rewrites a function's bytecode (its inline caches) as it
    warms up; done here once, every child inherits warm code instead of copying the
    pages each time it writes them."""
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    keys = [b"Http_Method", b"Http_Path", b"Http_Query", b"Http_ContentLength", b"Http_Host",
            b"Http_User_Agent", b"Http_Accept", b"Http_Content_Type", b"Http_Content_Length"]
    message = b"\0".join(k + b"\0v" for k in keys)
    saved = dict(os.environ)
    for _ in range(64):
        r, w = os.pipe()
        send_fds(a, b"%d" % 1, [r, w, w, w])
        _, fds = recv_fds(b, REQUEST_MAX, 4)
        for fd in fds:
            os.close(fd)
        apply_env(message)
        os.write(w, b"P %d\n" % os.getpid())
        os.read(r, 64)
        os.close(w)
        os.close(r)
        read_request()  # fd 0 is /dev/null here
        emit(None)
        emit({"statusCode": 200, "body": "", "headers": {"X": "y"}})
        json_string("x")
        is_response("x")
        sys.stdout.flush()
    for key in list(os.environ):
        if key not in saved:
            del os.environ[key]
    a.close()
    b.close()


def main():
    sys.stdout.reconfigure(encoding="utf-8", errors="surrogateescape")
    if sys.argv[1] == "--base":
        base()
    elif sys.argv[1] == "--check":
        check(sys.argv[2], STATUS_FD)
    else:
        try:
            module = load(sys.argv[1])
        except BaseException:
            import traceback

            traceback.print_exc()
            finish(STATUS_FD, "F 1", 1)
        serve(module, STATUS_FD)


if __name__ == "__main__":
    main()

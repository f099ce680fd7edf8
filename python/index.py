"""EdgeFaaS runner: runs a function's handle(req), a fresh process per request.

    python3 index.py [--layers=<abi>] <dir>/handler.py   exec mode: one request, then exit
    python3 index.py [--layers=<abi>] --base             fork mode: the base process (base())
    python3 index.py --check <dir>/handler.py            import the handler, report on fd 3

--layers: the daemon confined this process (Landlock ABI <abi>, 0 for none); the
runner confines each child further (undumpable, its own folder and layer).

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


def report(status, line):
    """Closes the request's stdio and reports `line` on `status`: the daemon has the
    whole output once the line arrives."""
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


def run_handler(module):
    """Runs one request on fds 0, 1 and 2; returns (status line, exit code or None to go on)."""
    try:
        return "R " + emit(module.handle(read_request())), None
    except SystemExit as exc:
        code = exit_code(exc)
        return ("R {}" if code == 0 else "F %d" % code), code
    except BaseException:
        import traceback

        traceback.print_exc()
        return "F 1", 1


def serve(module, status):
    """Runs one request, reports it on `status`, and exits."""
    line, code = run_handler(module)
    report(status, line)
    os._exit(code or 0)


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


def check(path, out, opts=None, ruleset=None):
    """Imports the handler in this throwaway process, confined as its zygote would
    be; writes `ok` or why not to `out`."""
    try:
        confine_function(opts or {}, ruleset)
        module = load(path)
        if not callable(getattr(module, "handle", None)):
            message = "handler.py defines no callable handle(req)"
        else:
            message = None
    except BaseException as exc:
        message = import_error(path, exc)
    os.write(out, b"ok" if message is None else ("fail " + message).encode("utf-8", "replace"))
    os._exit(0)


# Confinement the runner adds itself (the daemon applies the base layer before
# exec). Landlock through ctypes: the kernel's calls have no os.* wrapper.
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
PR_SET_DUMPABLE = 4
_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def undumpable():
    """No sibling can read this process's memory or environment, nor trace it."""
    libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def restrict(ruleset):
    """Enters the Landlock layer the daemon built (an fd); it closes the fd."""
    import ctypes

    if libc().syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "landlock_restrict_self: " + os.strerror(errno))
    os.close(ruleset)


def write_rights(abi):
    """The Landlock rights that change files, for this ABI."""
    rights = (1 << 1) | sum(1 << b for b in range(4, 13))
    if abi >= 2:
        rights |= 1 << 13  # refer
    if abi >= 3:
        rights |= 1 << 14  # truncate
    if abi >= 5:
        rights |= 1 << 15  # ioctl_dev
    return rights


def confine_writes(folder, abi):
    """A layer of its own: this process may write only under `folder` (and to
    /dev/null and the like), and signal only itself and its own children."""
    import ctypes

    class Attr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    rights = write_rights(abi)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    attr = Attr(rights, 0, 3 if abi >= 6 else 0)  # scope: abstract unix sockets, signals
    c = libc()
    ruleset = c.syscall(LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "landlock_create_ruleset: " + os.strerror(errno))
    try:
        for path, allowed in [(folder, rights)] + [(d, 1 << 1) for d in ("/dev/null", "/dev/zero", "/dev/full")]:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            rule = PathBeneath(allowed, fd)
            done = c.syscall(LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0)
            os.close(fd)
            if done != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, "landlock_add_rule: " + os.strerror(errno))
        restrict(ruleset)
    except BaseException:
        os.close(ruleset)
        raise


def confine_function(opts, ruleset):
    """What a function's zygote (or its import check) applies before the handler's
    code runs: its Landlock layer, its memory limit, its environment."""
    if ruleset is not None:
        restrict(ruleset)
    if "memory" in opts:
        import resource

        limit = int(opts["memory"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.update(opts.get("env", {}))
    if "secrets" in opts:
        os.environ["Secrets_Dir"] = opts["secrets"]


def parse_options(fields):
    """`key=value` options of a zygote or check; `env=K=V` repeats."""
    opts = {"env": {}}
    for field in fields:
        if not field:
            continue
        key, _, value = os.fsdecode(field).partition("=")
        if key == "env":
            k, _, v = value.partition("=")
            opts["env"][k] = v
        else:
            opts[key] = value
    return opts


def rmtree(path):
    """Removes an invocation's folder (shutil costs a warm process more to hold)."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


# Fork mode. The daemon starts one base process (`--base`), with the
# interpreter and this runner loaded, on a SOCK_SEQPACKET socket as its fd 0.
# Commands, each one message, answered b"pid <pid>":
#   b"Z\0<handler>" + fds   fork a zygote; fds: its socket, its options[, its Landlock layer]
#   b"C\0<handler>" + fds   fork an import check; fds: result pipe, options[, layer]
# The options are b"k=v\0k=v..." in a pipe the forked child reads (never the base).
# Options: tmp=<its invocations' folder> memory=<bytes> cpu=<seconds> nproc=<n>
# reuse=1 secrets=<folder> env=<K>=<V>... (and landlock=<abi>, which the base adds).
# A fork the kernel refuses is answered b"err <errno>". A zygote imports the handler,
# says b"ready <pid>" (or b"fail <why>" and exits) on its socket, and keeps one
# spare child forked and blocked on that socket. The daemon sends each request to
# the socket: its environment as b"k\0v\0..." (TMPDIR names the request's folder)
# with four fds (stdin, stdout, stderr, status) and a fifth, the request's Landlock
# layer, when there is one; the spare that receives it enters the layer, tells the
# zygote (which forks the next spare and keeps the status fd for the X line) and
# runs it. With reuse=1 the one child makes its own folder and layer and serves
# request after request. EOF on a socket ends its process.


def base(landlock):
    import gc
    import resource  # noqa: loaded here, once, for the zygotes' and children's limits
    import select
    import signal
    import socket

    ctl = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    if landlock is not None:
        undumpable()
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
            data, fds = recv_fds(ctl, 1 << 16, 3)
            if not data:
                os._exit(0)
            if len(fds) < 2:
                for passed in fds:
                    os.close(passed)
                ctl.send(b"err 22")
                continue
            kind, path = data.split(b"\0")[:2]
            path = os.fsdecode(path)
            ruleset = fds[2] if len(fds) > 2 else None
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as exc:  # out of processes: the daemon answers 503
                for passed in fds:
                    os.close(passed)
                ctl.send(b"err %d" % exc.errno)
                continue
            if pid == 0:
                ctl.close()
                for own in (wake_r, wake_w):
                    os.close(own)
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.setpgid(0, 0)
                # Its options, read here, after the fork: the base never holds them.
                opts = parse_options(read_all(fds[1]).split(b"\0"))
                os.close(fds[1])
                if landlock is not None:
                    opts["landlock"] = landlock
                if kind == b"Z":
                    zygote(socket.socket(fileno=fds[0]), path, opts, ruleset)
                else:
                    check(path, fds[0], opts, ruleset)
                os._exit(1)
            for passed in fds:
                os.close(passed)
            ctl.send(b"pid %d" % pid)


def read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


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


def zygote(requests, path, opts, ruleset):
    """A function's warm process: imports the handler once, then keeps a spare child."""
    import gc
    import select
    import signal
    import socket

    try:
        confine_function(opts, ruleset)
        os.chdir(os.path.dirname(os.path.abspath(path)))
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
        nonlocal want_spare
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError:
            want_spare = True  # out of processes: tried again shortly
            return
        want_spare = False
        if pid == 0:
            # Other requests' status pipes stay the zygote's: their EOF means their child is gone.
            for fd in own_fds + tuple(running.values()):
                os.close(fd)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            spare(requests, take, module, opts)
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
            if reuse:  # a reused child's own folder (otherwise the daemon's)
                rmtree(os.path.join(opts["tmp"], str(pid)))
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
    want_spare = False
    reuse = opts.get("reuse") == "1" and "tmp" in opts
    requests.send(b"ready %d" % os.getpid())
    fork_spare()
    poller = select.poll()
    poller.register(requests, 0)  # hang-up only: the spares read the requests
    poller.register(taken, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while accepting or running:
        if want_spare and accepting and not spares:
            fork_spare()
        for fd, events in poller.poll(100 if want_spare else None):
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


def spare(requests, take, module, opts):
    """A child forked ahead of its request: waits for the request, enters the
    request's own layer (its folder, from the daemon), then serves it. With reuse=1
    it makes its own folder and layer once and serves one request after another."""
    import resource

    pid = os.getpid()
    if "nproc" in opts:
        nproc = int(opts["nproc"])
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if opts.get("reuse") == "1":
        if "tmp" in opts:
            folder = os.path.join(opts["tmp"], str(pid))
            os.mkdir(folder, 0o700)
            if int(opts.get("landlock", "0")) > 0:
                confine_writes(folder, int(opts["landlock"]))
            os.environ["TMPDIR"] = folder
            if "tempfile" in sys.modules:
                sys.modules["tempfile"].tempdir = None
        serve_in_turn(requests, module, opts)
    if "cpu" in opts:
        cpu = int(opts["cpu"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    try:
        data, fds = recv_fds(requests, REQUEST_MAX, 5)
    except OSError:
        os._exit(0)
    if not data or len(fds) < 4:
        os._exit(0)
    if len(fds) == 5:
        restrict(fds[4])  # the request's layer: it writes only its own folder
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
    if "tempfile" in sys.modules:
        sys.modules["tempfile"].tempdir = None  # TMPDIR is the request's folder now
    serve(module, status)


def serve_in_turn(requests, module, opts):
    """reuse=1: one child, many requests, its state kept between them. Each request
    still gets its own pipes and environment; a crash or a kill ends the child (the
    zygote forks another, with fresh state)."""
    import resource

    os.setpgid(0, 0)
    pid = os.getpid()
    cpu = int(opts.get("cpu", "0"))
    clean_env = dict(os.environ)
    devnull = os.open(os.devnull, os.O_RDWR)
    while True:
        try:
            data, fds = recv_fds(requests, REQUEST_MAX, 4)
        except OSError:
            os._exit(0)
        if not data or len(fds) != 4:
            os._exit(0)
        status = fds[3]
        os.write(status, b"P %d\n" % pid)
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
            os.close(fd)
        apply_env(data)
        if cpu:
            used = resource.getrusage(resource.RUSAGE_SELF)
            spent = int(used.ru_utime + used.ru_stime)
            # Only the soft limit moves (a hard one cannot be raised again); the
            # daemon's deadline kill bounds the request whatever the handler does.
            hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
            resource.setrlimit(resource.RLIMIT_CPU, (spent + cpu, hard))
        line, code = run_handler(module)
        report(status, line)
        os.close(status)
        if code is not None and not line.startswith("R"):
            os._exit(code)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        for key in [k for k in os.environ if k not in clean_env]:
            del os.environ[key]
        os.environ.update(clean_env)


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
    args = sys.argv[1:]
    landlock = None
    if args and args[0].startswith("--layers="):
        landlock = int(args.pop(0).split("=", 1)[1])
    if args[0] == "--base":
        base(landlock)
    elif args[0] == "--check":
        check(args[1], STATUS_FD)
    else:
        if landlock is not None:
            undumpable()
        try:
            module = load(args[0])
        except BaseException:
            import traceback

            traceback.print_exc()
            report(STATUS_FD, "F 1")
            os._exit(1)
        serve(module, STATUS_FD)


if __name__ == "__main__":
    main()

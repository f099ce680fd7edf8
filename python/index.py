"""EdgeFaaS runner: runs a function's handle(req), one fresh process per request.

    python3 index.py /path/to/<name>/handler.py            # exec mode: one request
    python3 index.py --zygote /path/to/<name>/handler.py   # fork mode: see zygote()

The request body arrives on stdin and reaches handle() as str (bytes that are
not UTF-8 survive as surrogates and are written back unchanged). What the
handler prints, then its return value as print() shows it, is the response.
A returned dict of statusCode/body/headers (the OpenFaaS python3-http shape)
also sets the status and headers: they travel to the daemon as one last
stderr line, NUL "EDGEFAAS-META " JSON, which the daemon strips.
Works on Python 3.7 and later.
"""
import importlib.util
import gc
import os
import select
import signal
import socket
import sys

META_MARK = "\0EDGEFAAS-META "
RESPONSE_KEYS = {"statusCode", "body", "headers"}


def load(path):
    """Imports handler.py by path as module `handler`; its folder is importable."""
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("handler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["handler"] = module
    spec.loader.exec_module(module)
    return module


def read_request(stream):
    return stream.read().decode("utf-8", "surrogateescape")


def is_response(result):
    return isinstance(result, dict) and result and set(result) <= RESPONSE_KEYS


def encode_body(body):
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8", "surrogateescape")
    import json  # only here: it costs a warm zygote over a megabyte to hold

    return json.dumps(body).encode("utf-8")


def json_string(text):
    """A JSON string literal (the runner avoids importing json for its own messages)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " " or "\ud800" <= ch <= "\udfff":
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def emit(result, out, err):
    """Writes the handler's result to `out` (text stream) and its metadata to `err`."""
    if is_response(result):
        out.flush()
        out.buffer.write(encode_body(result.get("body")))
        out.buffer.flush()
        status = result.get("statusCode", 200)
        if not isinstance(status, int) or isinstance(status, bool):
            status = -1  # the daemon answers 500 naming it
        headers = ",".join(
            "[%s,%s]" % (json_string(str(k)), json_string(str(v)))
            for k, v in (result.get("headers") or {}).items()
        )
        err.write('\n%s{"statusCode":%d,"headers":[%s]}\n' % (META_MARK, status, headers))
        err.flush()
    elif result is not None:
        print(result, file=out)
    out.flush()


def exit_code(exc):
    """The status sys.exit(x) gives, printing a message as the interpreter would."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    sys.stderr.write(str(exc.code) + "\n")
    return 1


def serve_child(fds, env, module, import_error, own_fds):
    """In a forked child: take the request's pipes as 0/1/2 and run the handler once."""
    code = 1
    try:
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in list(fds) + own_fds:
            if fd > 2:
                os.close(fd)
        os.environ.update(env)
        if "random" in sys.modules:
            sys.modules["random"].seed()  # else every child would draw the zygote's numbers
        if import_error is not None:
            sys.stderr.write(import_error)
        else:
            result = module.handle(read_request(sys.stdin.buffer))
            emit(result, sys.stdout, sys.stderr)
            code = 0
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(code)


def zygote(path):
    """Fork mode: import the handler once, then fork a child per request.

    fd 0 is a SOCK_SEQPACKET socket to the daemon. Each request is one message,
    b"<id>\\0<key>\\0<value>\\0..." (its Http_* environment), carrying three fds
    (the child's stdin, stdout, stderr). For each we answer b"pid <id> <pid>"
    once the child runs in its own process group, and b"exit <id> <status>"
    (a wait status) once it has exited and its group has been killed.
    EOF on the socket ends the zygote.
    """
    ctl = socket.socket(fileno=0)
    try:
        module, import_error = load(path), None
    except BaseException:
        import traceback

        module, import_error = None, traceback.format_exc()
    # Objects that survive to here are shared with every child; keep the collector off them.
    gc.freeze()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    own_fds = [wake_r, wake_w]
    running = {}

    def send(kind, request, number):
        ctl.send(b"%s %d %d" % (kind, request, number))

    def reap():
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            try:
                os.killpg(pid, signal.SIGKILL)  # what the handler left running dies with it
            except OSError:
                pass
            _, status = os.waitpid(pid, 0)
            request = running.pop(pid, None)
            if request is not None:
                send(b"exit", request, status)

    open_ctl = True
    while open_ctl or running:
        readable, _, _ = select.select([ctl, wake_r] if open_ctl else [wake_r], [], [])
        if wake_r in readable:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            reap()
        if ctl not in readable:
            continue
        data, ancdata, _, _ = ctl.recvmsg(1 << 20, socket.CMSG_SPACE(3 * 4))
        if not data:
            # The daemon is gone: nobody will read these children's output.
            open_ctl = False
            for pid in list(running):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            continue
        fds = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(int.from_bytes(payload[i:i + 4], sys.byteorder) for i in range(0, len(payload) - 3, 4))
        fields = data.split(b"\0")
        request = int(fields[0])
        env = {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape") for k, v in zip(fields[1::2], fields[2::2])}
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            serve_child(fds, env, module, import_error, own_fds)
        try:
            os.setpgid(pid, pid)  # also done in the child: whichever runs first wins
        except OSError:
            pass
        for fd in fds:
            os.close(fd)
        running[pid] = request
        send(b"pid", request, pid)
    return 0


def main():
    sys.stdout.reconfigure(encoding="utf-8", errors="surrogateescape")
    if sys.argv[1] == "--zygote":
        sys.exit(zygote(sys.argv[2]))
    module = load(sys.argv[1])
    result = module.handle(read_request(sys.stdin.buffer))
    emit(result, sys.stdout, sys.stderr)


if __name__ == "__main__":
    main()

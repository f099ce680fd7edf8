"""EdgeFaaS runner: runs one function's handle(req) for one request.

    python3 index.py /path/to/<name>/handler.py

The request body arrives on stdin and reaches handle() as str (bytes that are
not UTF-8 survive as surrogates and are written back unchanged). What the
handler prints, then its return value as print() shows it, is the response.
A returned dict of statusCode/body/headers (the OpenFaaS python3-http shape)
also sets the status and headers: they travel to the daemon as one last
stderr line, NUL "EDGEFAAS-META " JSON, which the daemon strips.
Works on Python 3.7 and later.
"""
import importlib.util
import json
import os
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
    return json.dumps(body).encode("utf-8")


def emit(result, out, err):
    """Writes the handler's result to `out` (text stream) and its metadata to `err`."""
    if is_response(result):
        out.flush()
        out.buffer.write(encode_body(result.get("body")))
        out.buffer.flush()
        headers = [[str(k), str(v)] for k, v in (result.get("headers") or {}).items()]
        meta = {"statusCode": result.get("statusCode", 200), "headers": headers}
        err.write("\n" + META_MARK + json.dumps(meta) + "\n")
        err.flush()
    elif result is not None:
        print(result, file=out)
    out.flush()


def main():
    sys.stdout.reconfigure(encoding="utf-8", errors="surrogateescape")
    module = load(sys.argv[1])
    result = module.handle(read_request(sys.stdin.buffer))
    emit(result, sys.stdout, sys.stderr)


if __name__ == "__main__":
    main()

import json
import os


def handle(req):
    """Answers JSON with a status of its own: the OpenFaaS python3-http dict."""
    name = req.strip() or "world"
    if not name.isprintable():
        return {"statusCode": 400, "body": "name must be printable\n"}
    return {
        "statusCode": 201,
        "body": {"greeting": "hello " + name, "method": os.environ.get("Http_Method")},
        "headers": {"Content-Type": "application/json"},
    }

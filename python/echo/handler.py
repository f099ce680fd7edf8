def handle(req):
    """Returns the request body as it came: the default function."""
    return req

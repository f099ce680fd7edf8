def handle(req):
    """Averages comma-separated numbers: "0,1,1" -> 0.6666666666666666."""
    numbers = [float(x) for x in req.split(",") if x.strip()]
    return sum(numbers) / len(numbers)

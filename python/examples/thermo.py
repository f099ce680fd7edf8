# edgefaas: topic=sensors/+/temp timeout=5
"""A sensor's temperature, from MQTT: judged, and published back."""
import os


def handle(req):
    room = os.environ.get("Mqtt_Topic", "sensors/unknown/temp").split("/")[1]
    celsius = float(req)
    verdict = "too hot" if celsius > 28 else "fine"
    return {"body": "%s: %g C is %s" % (room, celsius, verdict)}

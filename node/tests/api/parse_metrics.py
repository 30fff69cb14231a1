"""Scrapes Prometheus endpoints and reads them with the official Python client's
OpenMetrics parser, which rejects anything outside the format; prints one JSON object:
{url: {"content_type": ..., "families": {name: {"type": ..., "samples": [[name, labels, value]]}}}}."""
import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

out = {}
for url in sys.argv[1:]:
    with urllib.request.urlopen(url, timeout=30) as response:
        content_type = response.headers.get("Content-Type", "")
        text = response.read().decode("utf-8")
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {
            "type": family.type,
            "samples": [[s.name, s.labels, s.value] for s in family.samples],
        }
    out[url] = {"content_type": content_type, "families": families}
print(json.dumps(out))

"""Scrape a /metrics URL and parse it with the Prometheus Python client's parser (a real
parser, not ours): print the samples as JSON ({"name", "labels", "value"} each) on stdout.
Exits non-zero when the answer is not 200, not the Prometheus text format, or does not parse.
Run inside the namespace whose loopback the agent listens on (ip netns exec)."""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

url = sys.argv[1]
with urllib.request.urlopen(url, timeout=10) as answer:
    content_type = answer.headers.get("Content-Type", "")
    text = answer.read().decode("utf-8")
if not content_type.startswith("text/plain; version=0.0.4"):
    sys.exit(f"Content-Type {content_type!r} is not the Prometheus text format 0.0.4")
samples = []
seen = set()
for family in text_string_to_metric_families(text):
    if family.type == "unknown":
        sys.exit(f"family {family.name} has no TYPE")
    for s in family.samples:
        identity = (s.name, tuple(sorted(s.labels.items())))
        if identity in seen:
            sys.exit(f"duplicate series {identity}")
        seen.add(identity)
        samples.append({"name": s.name, "labels": s.labels, "value": s.value})
json.dump(samples, sys.stdout)

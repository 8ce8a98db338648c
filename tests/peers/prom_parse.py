#!/usr/bin/env python3
"""Parse Prometheus text exposition from stdin with prometheus_client's own parser (a real consumer of
the format) and print the samples as JSON: [{"name", "labels", "value"}]. Exit 1 if it does not parse."""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main():
    text = sys.stdin.read()
    samples = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.append({"name": s.name, "labels": s.labels, "value": s.value})
    json.dump(samples, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()

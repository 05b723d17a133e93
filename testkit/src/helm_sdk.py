"""Helm's own Go SDK (helm-python-sdk) for testkit/src/helm.rs.

Reads one JSON request on stdin, writes one JSON answer on stdout:
{"ok": result} or {"error": {"type": "HelmValuesError", "message": "..."}}
for an error Helm reports. Anything else is a crash (exit status 1).

Requests ({"op": ..., "chart": path, ...}):
  render    values, name, namespace -> {template path: manifest}
            (Chart.render: the values merged with the chart's defaults and
            validated against values.schema.json, subchart conditions
            applied, templates rendered offline as `helm template` does)
  lint      values -> helm_python.lint(strict=True, with_subcharts=True)
  validate  values -> null (Chart.validate_schema)
  info      -> {metadata, values, schema, crds, dependencies} of the
            loaded chart
"""

import json
import sys

import helm_python as helm


def main():
    request = json.load(sys.stdin)
    op = request["op"]
    path = request["chart"]
    values = request.get("values") or {}
    try:
        if op == "lint":
            result = helm.lint(path, values, strict=True, with_subcharts=True)
        else:
            with helm.Chart.load(path) as chart:
                if op == "render":
                    result = chart.render(
                        values, name=request["name"], namespace=request["namespace"]
                    )
                elif op == "validate":
                    chart.validate_schema(values)
                    result = None
                elif op == "info":
                    result = {
                        "metadata": chart.metadata,
                        "values": chart.values,
                        "schema": chart.schema,
                        "crds": chart.crds,
                        "dependencies": chart.dependencies,
                    }
                else:
                    raise SystemExit(f"unknown op {op!r}")
    except helm.HelmError as e:
        answer = {"error": {"type": type(e).__name__, "message": str(e)}}
    else:
        answer = {"ok": result}
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()

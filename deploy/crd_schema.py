"""Turn a CustomResourceDefinition's openAPIV3Schema into the JSON Schema deploy/validate_k8s.py uses.

    python deploy/crd_schema.py CRD.yaml VERSION OUT.json --source "kserve/kserve@<commit> <path>" \
        [--keep spec.predictor ...]

Why: kubernetes-validate has no CRD schemas, so custom resources are checked with jsonschema
against deploy/k8s/schemas/<kind>-<group>-<version>.json. For the KServe kinds those files are made
from KServe's own CRDs (config/crd/full/ in the kserve repository; the commit is in `$comment`),
not written by hand. The conversion:
  - descriptions dropped (size); OpenAPI `nullable` -> also null; `x-kubernetes-int-or-string` ->
    integer or string; `x-kubernetes-preserve-unknown-fields` / `x-kubernetes-embedded-resource`
    -> any further members allowed; other `x-kubernetes-*` keys dropped;
  - every other object with `properties` rejects unknown members (`additionalProperties: false`),
    as the API server's strict field validation does, so a typo is an error here and not a field
    KServe silently prunes;
  - apiVersion and kind fixed to the CRD's; `--keep` limits `spec` to the named members (the
    InferenceService CRD repeats a full pod spec for each component; we deploy a predictor only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def convert(node: Any) -> Any:
    if isinstance(node, list):
        return [convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    open_object = bool(node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-embedded-resource"))
    for key, value in node.items():
        if key == "description" or key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: convert(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = convert(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [convert(v) for v in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not open_object:
        out["additionalProperties"] = False
    return out


def crd_schema(crd: dict[str, Any], version: str, source: str, keep: list[str]) -> dict[str, Any]:
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    (served,) = [v for v in spec["versions"] if v["name"] == version]
    schema = convert(served["schema"]["openAPIV3Schema"])
    props = schema["properties"]
    props["apiVersion"] = {"const": f"{group}/{version}"}
    props["kind"] = {"const": kind}
    props["metadata"] = {"type": "object"}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    if keep:
        spec_props = props["spec"]["properties"]
        props["spec"]["properties"] = {k: spec_props[k] for k in keep}
    kept = f"; spec limited to {', '.join(keep)}" if keep else ""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"{kind} ({group}/{version}) from {source}, converted by deploy/crd_schema.py{kept}. "
        "Regenerate with that script; do not edit by hand.",
        **schema,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path)
    parser.add_argument("version")
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", required=True, help="repository@commit path of the CRD")
    parser.add_argument("--keep", nargs="*", default=[], help="spec members to keep (default: all)")
    args = parser.parse_args(argv)
    crd = yaml.safe_load(args.crd.read_text())
    schema = crd_schema(crd, args.version, args.source, [k.removeprefix("spec.") for k in args.keep])
    # compact: the InferenceService predictor alone is a few hundred kB pretty-printed
    args.out.write_text(json.dumps(schema, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"{args.out}: {args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

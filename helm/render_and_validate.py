#!/usr/bin/env python3
"""Renders the imagetag chart with real Helm and validates every manifest offline.

For the default values and each values file in helm/examples/ (or the files given with
--values), this:

1. checks the values against the chart's values.schema.json (Helm's own validator),
2. lints the chart in strict mode (Helm's linter),
3. renders it (Helm's template engine: the Helm Go SDK through helm-python-sdk, no cluster),
4. validates every rendered object against the Kubernetes OpenAPI schemas of the oldest and
   newest Kubernetes versions the chart supports (kubernetes-validate, strict: unknown fields
   are errors), and the custom resources against the models generated from their CRDs: the
   Prometheus Operator's ServiceMonitor and PrometheusRule (cloudcoil-models-prometheus-operator),
   KEDA's ScaledObject and TriggerAuthentication (cloudcoil-models-keda). An object of any other
   kind is an error.

Nothing is downloaded. Exit status 0 when everything is valid, 1 otherwise.

    .venv/bin/python helm/render_and_validate.py [--values FILE ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HELM_DIR = Path(__file__).resolve().parent
CHART_DIR = HELM_DIR / "imagetag"
EXAMPLES_DIR = HELM_DIR / "examples"
RELEASE_NAME = "imagetag"
NAMESPACE = "imagetag"
# The chart's kubeVersion floor (Chart.yaml) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", "1.37.0")


@dataclass
class Rendering:
    """One values set, rendered: its objects (with the template each came from) and problems."""

    name: str
    values: dict[str, Any]
    objects: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    notes: str = ""
    errors: list[str] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for o in self.objects:
            if o.get("kind") == kind and o["metadata"]["name"] == name:
                return o
        raise KeyError(f"{self.name}: no {kind} {name}")


def example_files() -> list[Path]:
    return sorted(EXAMPLES_DIR.glob("*.yaml"))


def value_sets(files: list[Path] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """("default", {}) and one (file stem, values) per values file."""
    sets: list[tuple[str, dict[str, Any]]] = [("default", {})] if files is None else []
    for path in example_files() if files is None else files:
        sets.append((path.stem, yaml.safe_load(path.read_text()) or {}))
    return sets


def render(name: str, values: dict[str, Any]) -> Rendering:
    """Schema check, strict lint and render of the chart with `values` (Helm's own code)."""
    import helm_python as helm

    result = Rendering(name, values)
    with helm.Chart.load(CHART_DIR) as chart:
        try:
            chart.validate_schema(values)
        except helm.HelmError as error:
            result.errors.append(f"values.schema.json rejects the values: {error}")
            return result
        for kube_version in KUBE_VERSIONS:
            report = helm.lint(CHART_DIR, values, strict=True, kube_version=f"v{kube_version}")
            for message in report.get("messages", []):
                if message.get("severity", 0) >= 2:  # warnings fail too (strict)
                    result.errors.append(f"helm lint (Kubernetes {kube_version}): {message.get('path')}: {message.get('error')}")
            result.errors.extend(f"helm lint (Kubernetes {kube_version}): {e}" for e in report.get("errors", []))
        try:
            manifests = chart.render(values, name=RELEASE_NAME, namespace=NAMESPACE, is_install=True)
        except helm.HelmError as error:
            result.errors.append(f"helm template failed: {error}")
            return result
    for source, text in sorted(manifests.items()):
        if source.endswith("NOTES.txt"):
            result.notes = text
            continue
        try:
            documents = list(yaml.safe_load_all(text))
        except yaml.YAMLError as error:
            result.errors.append(f"{source}: not YAML: {error}")
            continue
        for document in documents:
            if document:
                result.objects.append(document)
                result.sources.append(source)
    return result


def validate(rendering: Rendering) -> list[str]:
    """Validates each object; returns the problems (also appended to `rendering.errors`)."""
    import kubernetes_validate

    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for obj, source in zip(rendering.objects, rendering.sources):
        what = f"{source}: {obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        key = (str(obj.get("kind")), str((obj.get("metadata") or {}).get("name")))
        if key in seen:
            problems.append(f"{what}: rendered twice")
        seen.add(key)
        if obj.get("kind") in CUSTOM_RESOURCES:
            problems.extend(f"{what}: {p}" for p in validate_custom_resource(obj))
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(part) for part in error.path) or "(top)"
                problems.append(f"{what}: invalid for Kubernetes {version}: {path}: {error.message}")
            except kubernetes_validate.SchemaNotFoundError as error:
                problems.append(f"{what}: no schema for Kubernetes {version}: {error.message}")
    rendering.errors.extend(problems)
    return problems


# kind -> (apiVersion, module of the model generated from the CRD); the model class is the kind.
CUSTOM_RESOURCES = {
    "ServiceMonitor": ("monitoring.coreos.com/v1", "cloudcoil.models.prometheus_operator.v1"),
    "PrometheusRule": ("monitoring.coreos.com/v1", "cloudcoil.models.prometheus_operator.v1"),
    "ScaledObject": ("keda.sh/v1alpha1", "cloudcoil.models.keda.v1alpha1"),
    "TriggerAuthentication": ("keda.sh/v1alpha1", "cloudcoil.models.keda.v1alpha1"),
}


def validate_custom_resource(obj: dict[str, Any]) -> list[str]:
    """Against the model generated from the resource's CRD; fields the model does not know are
    reported (the model itself would drop them silently)."""
    import importlib

    import pydantic

    api_version, module = CUSTOM_RESOURCES[obj["kind"]]
    if obj.get("apiVersion") != api_version:
        return [f"apiVersion {obj.get('apiVersion')!r}, the CRD serves {api_version!r}"]
    model_class = getattr(importlib.import_module(module), obj["kind"])
    try:
        model = model_class.model_validate(obj)
    except pydantic.ValidationError as error:
        return [f"invalid {obj['kind']}: {e['loc']}: {e['msg']}" for e in error.errors(include_url=False)]
    known = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"unknown field {path}" for path in _unknown_fields(obj, known)]


def _unknown_fields(given: Any, known: Any, path: str = "") -> list[str]:
    if isinstance(given, dict):
        known = known if isinstance(known, dict) else {}
        unknown = []
        for key, value in given.items():
            child = f"{path}.{key}" if path else key
            if key not in known:
                unknown.append(child)
            else:
                unknown.extend(_unknown_fields(value, known[key], child))
        return unknown
    if isinstance(given, list) and isinstance(known, list):
        return [p for i, (g, k) in enumerate(zip(given, known)) for p in _unknown_fields(g, k, f"{path}[{i}]")]
    return []


def render_and_validate(name: str, values: dict[str, Any]) -> Rendering:
    rendering = render(name, values)
    if rendering.objects:
        validate(rendering)
    return rendering


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=Path, action="append", help="values file (default: the defaults and helm/examples/*.yaml)")
    parser.add_argument("--out", type=Path, help="write each rendering to DIR/<name>.yaml")
    args = parser.parse_args(argv)

    failed = 0
    for name, values in value_sets(args.values):
        rendering = render_and_validate(name, values)
        kinds = sorted({o["kind"] for o in rendering.objects})
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.yaml").write_text(yaml.safe_dump_all(rendering.objects, sort_keys=False))
        if rendering.errors:
            failed += 1
            print(f"FAIL {name}: {len(rendering.errors)} problem(s)")
            for error in rendering.errors:
                print(f"  {error}")
        else:
            print(f"ok   {name}: {len(rendering.objects)} objects valid for Kubernetes "
                  f"{' and '.join(KUBE_VERSIONS)} ({', '.join(kinds)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

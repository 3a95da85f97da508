#!/usr/bin/env python3
"""Validates deploy/kubernetes/*.yaml offline and strictly against the API schemas that the PyPI
package kubernetes-validate ships (an unknown field is an error), then checks what the schemas
cannot see (the API server would accept these mistakes and the pods would fail on the node):

    check-manifests.py [--each-must-fail] CRATE_VERSION FILE...

Without the flag, the files together must pass. With it, each file on its own must be refused
(the negative test: broken copies of a manifest). One process for every check: loading the
schemas is most of the cost.

- strict schema validation against each Kubernetes version in K8S_VERSIONS;
- every document is one of the kinds we ship (kubernetes-validate only warns on an unknown kind);
- every image is localhost/wg-cni:VERSION (the crate's version: `make image` tags it so);
- every volumeMount names a volume of its pod, every `$(VAR)` in command/args an env var of its
  container, every configMapKeyRef/secretKeyRef and configMap/secret volume item a key of a
  ConfigMap/Secret in these files;
- the conflist template is JSON: a wg-cni network with cniVersion 1.0.0 and cniVersions;
- the agent's probes ask 127.0.0.1 on the port of its --health-listen.
Run with the interpreter of the venv that has kubernetes-validate (it brings PyYAML).
"""
import json
import re
import sys

import kubernetes_validate
import yaml

# ../shared/k8s runs 1.36; 1.37 is the newest the pinned kubernetes-validate knows.
K8S_VERSIONS = ["1.36.0", "1.37.0"]
KINDS = {"Namespace", "ServiceAccount", "ConfigMap", "Secret", "DaemonSet"}


class Refused(Exception):
    pass


def fail(msg):
    raise Refused(msg)


def main():
    args = sys.argv[1:]
    each = bool(args) and args[0] == "--each-must-fail"
    if each:
        args = args[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    version, files = args[0], args[1:]
    if not each:
        try:
            check(version, files)
        except Refused as e:
            sys.exit(f"check-manifests: {e}")
        return
    for path in files:
        try:
            check(version, [path])
        except Refused as e:
            print(f"refused as it should be: {e}")
            continue
        sys.exit(f"check-manifests: {path} was accepted, but must be refused")


def check(version, files):
    docs = []
    for path in files:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((path, doc))
    data = {}  # (kind, namespace, name) -> keys
    for path, doc in docs:
        kind = doc.get("kind")
        if kind not in KINDS:
            fail(f"{path}: unexpected kind {kind!r} (expected one of {sorted(KINDS)})")
        for k8s in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, k8s, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                fail(f"{path}: {kind} against Kubernetes {k8s}: {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(f"{path}: {e.message}")
        meta = doc["metadata"]
        if kind in ("ConfigMap", "Secret"):
            keys = set(doc.get("data") or {}) | set(doc.get("stringData") or {})
            data[(kind, meta.get("namespace"), meta["name"])] = keys
            if kind == "ConfigMap":
                check_conflists(path, doc)

    daemonsets = 0
    for path, doc in docs:
        if doc["kind"] != "DaemonSet":
            continue
        daemonsets += 1
        ns = doc["metadata"]["namespace"]
        spec = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            for kind, ref in (("ConfigMap", v.get("configMap")), ("Secret", v.get("secret"))):
                if ref is None:
                    continue
                name = ref.get("name") or ref.get("secretName")
                have_keys(data, path, kind, ns, name, [i["key"] for i in ref.get("items", [])])
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{path}: {doc['metadata']['name']}/{c['name']}"
            if c["image"] != f"localhost/wg-cni:{version}":
                fail(f"{where}: image {c['image']}, expected localhost/wg-cni:{version}")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    fail(f"{where}: volumeMount {m['name']} names no volume")
            env = {e["name"]: e for e in c.get("env", [])}
            for arg in c.get("command", []) + c.get("args", []):
                for var in re.findall(r"\$\((\w+)\)", arg):
                    if var not in env:
                        fail(f"{where}: {arg} uses $({var}), which is not in env")
            for e in env.values():
                source = e.get("valueFrom", {})
                for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if key in source:
                        ref = source[key]
                        have_keys(data, path, kind, ns, ref["name"], [ref["key"]])
            if c["name"] == "agent":
                check_probes(where, c)
    if daemonsets == 0:
        fail("no DaemonSet found")


def have_keys(data, path, kind, ns, name, keys):
    have = data.get((kind, ns, name))
    if have is None:
        fail(f"{path}: {kind} {ns}/{name} is not in these files")
    for key in keys:
        if key not in have:
            fail(f"{path}: {kind} {ns}/{name} has no key {key!r}")


def check_conflists(path, doc):
    for key, text in (doc.get("data") or {}).items():
        if not key.endswith(".conflist"):
            continue
        try:
            conf = json.loads(text)
        except ValueError as e:
            fail(f"{path}: {key} is not JSON: {e}")
        if conf.get("cniVersion") != "1.0.0" or "1.1.0" not in conf.get("cniVersions", []):
            fail(f"{path}: {key}: cniVersion 1.0.0 and cniVersions with 1.1.0 expected")
        plugins = conf.get("plugins") or [{}]
        if plugins[0].get("type") != "wg-cni" or not conf.get("name"):
            fail(f"{path}: {key}: a named network whose first plugin is wg-cni expected")


def check_probes(where, c):
    listen = [a.split("=", 1)[1] for a in c.get("args", []) if a.startswith("--health-listen=")]
    if len(listen) != 1:
        fail(f"{where}: one --health-listen=ADDR:PORT expected")
    host, port = listen[0].rsplit(":", 1)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet", {})
        if (get.get("host"), str(get.get("port")), get.get("path")) != (host, port, path):
            fail(f"{where}: {probe} must ask http://{host}:{port}{path}")


if __name__ == "__main__":
    main()

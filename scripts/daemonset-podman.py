#!/usr/bin/env python3
"""Runs a container of a DaemonSet the way kubelet would, as a `podman run` command line read from
the manifests (scripts/test-daemonset.sh runs it on simulated nodes):

    daemonset-podman.py MANIFEST... --daemonset NAME --container NAME --node NAME --host-ip IP
        --netns PATH --node-root DIR --shared-host-path PATH... --volumes-dir DIR
        [--secret NAME/KEY=@FILE|VALUE...] [--name CONTAINER_NAME]

prints the arguments after `podman run`, each ended by a NUL byte, and makes what the pod
needs on the node: hostPath directories and files by their `type`, the ConfigMap and Secret
volumes as files. Also:

    daemonset-podman.py MANIFEST... --daemonset NAME --host-paths
        the DaemonSet's hostPath paths, one per line
    daemonset-podman.py MANIFEST... --daemonset NAME --container NAME --probe readinessProbe
        the probe's httpGet as host port path

What kubelet does, done here: host network and PID namespaces (`hostNetwork` is the simulated
node's network namespace, PATH), privileges and capabilities, read-only root, the volumes with
their read-only flags and mount propagation, env from values, the downward API (spec.nodeName,
status.hostIP), ConfigMap and Secret keys, command and args with `$(VAR)` expanded from the
container's env, restartPolicy. A hostPath is a directory of the node under DIR (NODE_ROOT/path:
the simulated node's own files), except the --shared-host-path ones, which are the machine's
(the named network namespaces). A Secret's values may be replaced (--secret): the manifest's
Secret is an example the user replaces. Anything of the pod spec this does not know how to run
is refused, so the test never runs something other than what the manifest says.
"""
import argparse
import base64
import json
import os
import re
import sys

import yaml

# Pod spec fields that change nothing in a podman run on one node (scheduling, accounting,
# API identity), and that this script therefore ignores.
IGNORED_POD_FIELDS = {
    "serviceAccountName", "automountServiceAccountToken", "priorityClassName", "nodeSelector",
    "tolerations", "terminationGracePeriodSeconds", "dnsPolicy",
}
IGNORED_CONTAINER_FIELDS = {"name", "image", "imagePullPolicy", "resources", "livenessProbe",
                            "readinessProbe"}


def die(msg):
    sys.exit(f"daemonset-podman: {msg}")


def load(paths):
    docs = []
    for path in paths:
        docs += [d for d in yaml.safe_load_all(open(path)) if d]
    return docs


def find(docs, kind, name):
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    die(f"no {kind} {name} in the manifests")


def secret_data(docs, name, overrides):
    secret = find(docs, "Secret", name)
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    data.update(secret.get("stringData", {}))
    for override in overrides:
        ref, value = override.split("=", 1)
        if ref.split("/", 1)[0] == name:
            data[ref.split("/", 1)[1]] = open(value[1:]).read() if value.startswith("@") else value
    return data


def env_of(container, docs, args):
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            values = {"spec.nodeName": args.node, "status.hostIP": args.host_ip}
            if field not in values:
                die(f"env {var['name']}: fieldRef {field} is not simulated")
            env[var["name"]] = values[field]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = secret_data(docs, ref["name"], args.secret)[ref["key"]]
        else:
            die(f"env {var['name']}: {list(source)} is not simulated")
    if container.get("envFrom"):
        die("envFrom is not simulated")
    return env


def expand(text, env):
    """Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` escapes."""
    def one(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, text)


def host_path(args, path):
    # /var/run is /run on every current distribution: one directory of the node (and of the
    # machine: a shared path is matched in either spelling).
    path = without_var_run(path)
    if path in map(without_var_run, args.shared_host_path):
        return path
    return os.path.join(args.node_root, path.lstrip("/"))


def without_var_run(path):
    return path[len("/var"):] if path.startswith("/var/run/") else path


def make_host_path(args, volume):
    spec = volume["hostPath"]
    path, kind = host_path(args, spec["path"]), spec.get("type", "")
    if kind == "DirectoryOrCreate":
        os.makedirs(path, exist_ok=True)
    elif kind == "FileOrCreate":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "a").close()
    elif kind == "Directory" and not os.path.isdir(path):
        die(f"hostPath {spec['path']} (type Directory) is missing on node {args.node}: {path}")
    elif kind == "File" and not os.path.isfile(path):
        die(f"hostPath {spec['path']} (type File) is missing on node {args.node}: {path}")
    elif kind not in ("DirectoryOrCreate", "FileOrCreate", "Directory", "File", ""):
        die(f"hostPath type {kind} is not simulated")
    return path


def write_items(directory, data, items, mode):
    os.makedirs(directory, exist_ok=True)
    for key, rel in ([(i["key"], i["path"]) for i in items] if items else
                     [(k, k) for k in data]):
        path = os.path.join(directory, rel)
        with open(path, "w") as f:
            f.write(data[key])
        os.chmod(path, mode)


def volume_source(args, docs, volume):
    if "hostPath" in volume:
        return make_host_path(args, volume), False
    directory = os.path.join(args.volumes_dir, volume["name"])
    if "configMap" in volume:
        spec = volume["configMap"]
        data = find(docs, "ConfigMap", spec["name"])["data"]
        write_items(directory, data, spec.get("items"), spec.get("defaultMode", 0o644))
    elif "secret" in volume:
        spec = volume["secret"]
        data = secret_data(docs, spec["secretName"], args.secret)
        write_items(directory, data, spec.get("items"), spec.get("defaultMode", 0o644))
    else:
        die(f"volume {volume['name']}: {[k for k in volume if k != 'name']} is not simulated")
    # kubelet mounts ConfigMap and Secret volumes read-only.
    return directory, True


def security(context):
    out = []
    for key, value in (context or {}).items():
        if key == "privileged":
            out += ["--privileged"] if value else []
        elif key == "allowPrivilegeEscalation":
            out += [] if value else ["--security-opt", "no-new-privileges"]
        elif key == "readOnlyRootFilesystem":
            out += ["--read-only"] if value else []
        elif key == "capabilities":
            out += [f"--cap-drop={c}" for c in value.get("drop", [])]
            out += [f"--cap-add={c}" for c in value.get("add", [])]
        elif key in ("runAsUser", "runAsGroup"):
            out += [] if value == 0 else die(f"securityContext {key}={value} is not simulated")
        else:
            die(f"securityContext {key} is not simulated")
    return out


def run_args(docs, daemonset, args):
    pod = daemonset["spec"]["template"]["spec"]
    unknown = set(pod) - IGNORED_POD_FIELDS - {
        "hostNetwork", "hostPID", "initContainers", "containers", "volumes", "restartPolicy"}
    if unknown:
        die(f"pod spec fields not simulated: {sorted(unknown)}")
    containers = {c["name"]: (c, False) for c in pod["containers"]}
    containers.update({c["name"]: (c, True) for c in pod.get("initContainers", [])})
    if args.container not in containers:
        die(f"no container {args.container} in DaemonSet {args.daemonset}")
    container, init = containers[args.container]
    unknown = set(container) - IGNORED_CONTAINER_FIELDS - {
        "command", "args", "env", "securityContext", "volumeMounts"}
    if unknown:
        die(f"container fields not simulated: {sorted(unknown)}")
    if not pod.get("hostNetwork"):
        die("only host-network pods are simulated (the node's namespace)")
    out = ["--network", f"ns:{args.netns}", "--hostname", args.node]
    if pod.get("hostPID"):
        out += ["--pid", "host"]
    if not init:
        # kubelet restarts a DaemonSet pod's containers (restartPolicy Always, the only one a
        # DaemonSet allows); an init container runs once, to completion.
        out += ["--restart", {"Always": "always"}[pod.get("restartPolicy", "Always")]]
    out += security(container.get("securityContext"))
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        source, read_only = volume_source(args, docs, volumes[mount["name"]])
        options = []
        if read_only or mount.get("readOnly"):
            options.append("ro")
        propagation = mount.get("mountPropagation", "None")
        options.append({"None": "rprivate", "HostToContainer": "rslave",
                        "Bidirectional": "rshared"}[propagation])
        out += ["--volume", f"{source}:{mount['mountPath']}:{','.join(options)}"]
    env = env_of(container, docs, args)
    for name, value in env.items():
        out += ["--env", f"{name}={value}"]
    command = [expand(w, env) for w in container.get("command", [])]
    words = [expand(w, env) for w in container.get("args", [])]
    if command:
        out += ["--entrypoint", json.dumps(command)]
    if args.name:
        out += ["--name", args.name]
    return out + [container["image"]] + words


def main():
    p = argparse.ArgumentParser()
    p.add_argument("manifests", nargs="+")
    p.add_argument("--daemonset", required=True)
    p.add_argument("--container")
    p.add_argument("--node")
    p.add_argument("--host-ip")
    p.add_argument("--netns")
    p.add_argument("--node-root")
    p.add_argument("--shared-host-path", action="append", default=[])
    p.add_argument("--volumes-dir")
    p.add_argument("--secret", action="append", default=[])
    p.add_argument("--name")
    p.add_argument("--host-paths", action="store_true")
    p.add_argument("--probe")
    args = p.parse_args()
    docs = load(args.manifests)
    daemonset = find(docs, "DaemonSet", args.daemonset)
    pod = daemonset["spec"]["template"]["spec"]
    if args.host_paths:
        for v in pod.get("volumes", []):
            if "hostPath" in v:
                print(v["hostPath"]["path"])
        return
    if args.probe:
        container = next(c for c in pod["containers"] if c["name"] == args.container)
        get = container[args.probe]["httpGet"]
        print(get.get("host", "127.0.0.1"), get["port"], get["path"])
        return
    sys.stdout.write("".join(word + "\0" for word in run_args(docs, daemonset, args)))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A minimal CRI client (what crictl would do) for the harness, over the CRI v1 gRPC API.

    cri_client.py --endpoint unix:///path/containerd.sock COMMAND [ARGS]

Commands (output on stdout, one JSON document or one ID; errors on stderr, exit 1):
  version                                  runtime name, version, CRI API version
  run-sandbox NAME NAMESPACE UID LOGDIR    RunPodSandbox -> sandbox ID
  sandbox-status ID                        {"state","ip","additionalIps","netns"}
  create-container SANDBOX NAME IMAGE ARG...   CreateContainer + StartContainer -> container ID
  exec CONTAINER TIMEOUT ARG...            ExecSync: prints stdout/stderr, exits with its code
  stop-sandbox ID / remove-sandbox ID      StopPodSandbox / RemovePodSandbox
  list-sandboxes                           JSON list of {"id","name","state"}
  remove-all                               stop + remove every sandbox (cleanup path)

The sandbox config a command needs again (CreateContainer takes it) is rebuilt from the
sandbox's metadata, as kubelet keeps it. Stubs come from the CRI api.proto (runtime.v1),
generated with grpcio-tools into the directory named by WGC_CRI_STUBS.
"""
import json
import os
import sys

sys.path.insert(0, os.environ.get("WGC_CRI_STUBS", os.path.dirname(__file__)))

import grpc  # noqa: E402
import v1_pb2 as api  # noqa: E402
import v1_pb2_grpc as rpc  # noqa: E402

TIMEOUT = 60  # seconds for one call


def sandbox_config(name, namespace, uid, logdir):
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, namespace=namespace, uid=uid, attempt=0),
        hostname=name,
        log_directory=logdir,
        linux=api.LinuxPodSandboxConfig(
            security_context=api.LinuxSandboxSecurityContext(
                namespace_options=api.NamespaceOption(network=api.POD, pid=api.CONTAINER,
                                                      ipc=api.POD))),
    )


def config_of(runtime, sandbox_id):
    status = runtime.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
                                      timeout=TIMEOUT)
    md = status.status.metadata
    logdir = status.status.annotations.get("wgc.logdir", "")
    return sandbox_config(md.name, md.namespace, md.uid, logdir)


def netns_of(info):
    """The sandbox's network namespace path from containerd's verbose `info`."""
    try:
        spec = json.loads(info.get("info", "{}")).get("runtimeSpec", {})
    except ValueError:
        return ""
    for ns in spec.get("linux", {}).get("namespaces", []):
        if ns.get("type") == "network":
            return ns.get("path", "")
    return ""


def main(argv):
    if len(argv) < 3 or argv[0] != "--endpoint":
        sys.exit(__doc__)
    channel = grpc.insecure_channel(argv[1])
    runtime = rpc.RuntimeServiceStub(channel)
    cmd, args = argv[2], argv[3:]

    if cmd == "version":
        v = runtime.Version(api.VersionRequest(version="v1"), timeout=TIMEOUT)
        print(json.dumps({"runtime": v.runtime_name, "version": v.runtime_version,
                          "api": v.runtime_api_version}))
    elif cmd == "run-sandbox":
        name, namespace, uid, logdir = args
        config = sandbox_config(name, namespace, uid, logdir)
        config.annotations["wgc.logdir"] = logdir
        r = runtime.RunPodSandbox(api.RunPodSandboxRequest(config=config), timeout=TIMEOUT)
        print(r.pod_sandbox_id)
    elif cmd == "sandbox-status":
        r = runtime.PodSandboxStatus(
            api.PodSandboxStatusRequest(pod_sandbox_id=args[0], verbose=True), timeout=TIMEOUT)
        net = r.status.network
        print(json.dumps({
            "state": api.PodSandboxState.Name(r.status.state),
            "ip": net.ip,
            "additionalIps": [a.ip for a in net.additional_ips],
            "netns": netns_of(r.info),
        }))
    elif cmd == "create-container":
        sandbox, name, image, command = args[0], args[1], args[2], args[3:]
        config = api.ContainerConfig(
            metadata=api.ContainerMetadata(name=name, attempt=0),
            image=api.ImageSpec(image=image),
            command=command,
            log_path=name + ".log",
            linux=api.LinuxContainerConfig(),
        )
        c = runtime.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=sandbox, config=config,
            sandbox_config=config_of(runtime, sandbox)), timeout=TIMEOUT)
        runtime.StartContainer(api.StartContainerRequest(container_id=c.container_id),
                               timeout=TIMEOUT)
        print(c.container_id)
    elif cmd == "exec":
        container, timeout, command = args[0], int(args[1]), args[2:]
        r = runtime.ExecSync(api.ExecSyncRequest(container_id=container, cmd=command,
                                                 timeout=timeout), timeout=timeout + TIMEOUT)
        sys.stdout.write(r.stdout.decode(errors="replace"))
        sys.stderr.write(r.stderr.decode(errors="replace"))
        return r.exit_code
    elif cmd == "stop-sandbox":
        runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=args[0]),
                               timeout=TIMEOUT)
    elif cmd == "remove-sandbox":
        runtime.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=args[0]),
                                 timeout=TIMEOUT)
    elif cmd == "list-sandboxes":
        r = runtime.ListPodSandbox(api.ListPodSandboxRequest(), timeout=TIMEOUT)
        print(json.dumps([{"id": s.id, "name": s.metadata.name,
                           "state": api.PodSandboxState.Name(s.state)} for s in r.items]))
    elif cmd == "remove-all":
        r = runtime.ListPodSandbox(api.ListPodSandboxRequest(), timeout=TIMEOUT)
        failed = 0
        for s in r.items:
            for call, req in ((runtime.StopPodSandbox, api.StopPodSandboxRequest),
                              (runtime.RemovePodSandbox, api.RemovePodSandboxRequest)):
                try:
                    call(req(pod_sandbox_id=s.id), timeout=TIMEOUT)
                except grpc.RpcError as e:
                    failed = 1
                    print(f"{s.id}: {e.details()}", file=sys.stderr)
        return failed
    else:
        sys.exit(__doc__)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except grpc.RpcError as e:
        print(f"cri_client: {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)

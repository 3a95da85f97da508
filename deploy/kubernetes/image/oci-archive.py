#!/usr/bin/env python3
"""Write a one-layer container image archive from a root file system directory, offline.

    oci-archive.py ROOTFS OUT.tar NAME:TAG VERSION CMD_JSON

The archive is both an OCI image layout (oci-layout, index.json, blobs/) and a docker-archive
(manifest.json naming the same blobs), as `docker save` writes since Docker 25: `podman load`
and `ctr images import` (and so ../shared/k8s's `cluster.sh load-image`) take it and tag it
NAME:TAG (both tested with Debian 12's podman 4.3 and containerd 1.6). The layer is gzip-compressed. Every entry is owned by root with mtime 0
and the layer is gzipped without a timestamp, so the same inputs give the same image id.
Stdlib only.
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile


def _reset(info):
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def layer_tar(rootfs):
    """The root file system as an uncompressed tar (entries sorted, as tarfile.add does)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as layer:
        for entry in sorted(os.listdir(rootfs)):
            layer.add(os.path.join(rootfs, entry), arcname=entry, filter=_reset)
    return buf.getvalue()


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    rootfs, out, name, version, cmd = sys.argv[1:]
    repository, tag = name.rsplit(":", 1)

    diff = layer_tar(rootfs)
    diff_id = "sha256:" + hashlib.sha256(diff).hexdigest()
    layer = gzip.compress(diff, compresslevel=9, mtime=0)

    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": json.loads(cmd),
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": "wg-cni",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.description":
                    "wg-cni's CNI plugin, node agent and userspace WireGuard daemon",
                "org.opencontainers.image.licenses":
                    "(MIT OR Apache-2.0) AND LGPL-2.1-or-later AND MPL-2.0",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z",
                     "created_by": "deploy/kubernetes/image/build.sh"}],
    }
    blobs = {}

    def blob(media_type, data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    config_desc = blob("application/vnd.oci.image.config.v1+json",
                       json.dumps(config, sort_keys=True).encode())
    layer_desc = blob("application/vnd.oci.image.layer.v1.tar+gzip", layer)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc = blob("application/vnd.oci.image.manifest.v1+json",
                         json.dumps(manifest, sort_keys=True).encode())
    manifest_desc["annotations"] = {
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": tag,
    }
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [manifest_desc]}
    path = lambda digest: "blobs/sha256/" + digest.split(":", 1)[1]
    docker_manifest = [{
        "Config": path(config_desc["digest"]),
        "RepoTags": [name],
        "Layers": [path(layer_desc["digest"])],
    }]
    assert repository

    tmp = out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as archive:
        def add(member, data):
            info = _reset(tarfile.TarInfo(member))
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps(index, sort_keys=True).encode())
        add("manifest.json", json.dumps(docker_manifest, sort_keys=True).encode())
        for digest, data in sorted(blobs.items()):
            add(path(digest), data)
    os.replace(tmp, out)
    print(f"{out}: {name}, image id {config_desc['digest']}, "
          f"layer {len(layer) / 1e6:.1f} MB compressed, {len(diff) / 1e6:.1f} MB unpacked")


if __name__ == "__main__":
    main()

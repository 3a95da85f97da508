#!/usr/bin/env python3
"""Write a single-layer OCI image archive (for `ctr images import`) from a root file system dir.

    mkimage.py ROOTFS OUT.tar NAME ENTRYPOINT_JSON

NAME becomes the `io.containerd.image.name` annotation, so `ctr -n k8s.io images import` stores
the image under exactly that reference. No registry is involved. Stdlib only.
"""
import hashlib
import io
import json
import sys
import tarfile


def _reset(info):
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    rootfs, out, name, entrypoint = sys.argv[1:]

    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as layer:
        layer.add(rootfs, arcname=".", filter=_reset)
    layer_bytes = layer_buf.getvalue()
    layer_digest = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()

    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": json.loads(entrypoint),
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    blobs = {}

    def blob(media_type, data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    config_desc = blob("application/vnd.oci.image.config.v1+json",
                       json.dumps(config, sort_keys=True).encode())
    layer_desc = blob("application/vnd.oci.image.layer.v1.tar", layer_bytes)
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
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
    }
    index = {"schemaVersion": 2, "manifests": [manifest_desc]}

    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        def add(path, data):
            info = _reset(tarfile.TarInfo(path))
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps(index, sort_keys=True).encode())
        for digest, data in blobs.items():
            add("blobs/sha256/" + digest.split(":", 1)[1], data)


if __name__ == "__main__":
    main()

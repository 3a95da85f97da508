#!/bin/bash
# wg-cni as the clients see it: runs the real binary with the same environment, stdin and
# arguments, passes its stdout and exit code through unchanged, and appends one JSON line per
# call to a trace file (what the client sent, what it got back). lib.sh's make_bin_dir fills in
# the @..@.
real='@REAL@'
trace='@TRACE@'

stdin=$(cat)

out=$(printf '%s' "$stdin" | "$real" "$@")
rc=$?

{
  flock 9
  jq -nc --arg t "$(date +%s.%N)" --arg cmd "${CNI_COMMAND-}" --arg cid "${CNI_CONTAINERID-}" \
    --arg netns "${CNI_NETNS-}" --arg ifname "${CNI_IFNAME-}" --arg args "${CNI_ARGS-}" \
    --arg path "${CNI_PATH-}" --arg stdin "$stdin" --arg out "$out" --argjson rc "$rc" '
    ($stdin | fromjson? // {}) as $conf | ($out | fromjson? // {}) as $res | {
      t: ($t | tonumber), cmd: $cmd, containerId: $cid, netns: $netns, ifname: $ifname,
      args: $args, path: $path,
      cniVersion: (if ($conf | type) == "object" then $conf.cniVersion // "" else "" end),
      prevResult: (($conf | type) == "object" and ($conf | has("prevResult"))),
      runtimeConfig: (if ($conf | type) == "object" then $conf.runtimeConfig else null end),
      rc: $rc,
      code: (if ($res | type) == "object" then $res.code else null end),
      msg: (if ($res | type) == "object" then $res.msg else null end),
      ips: (if ($res | type) == "object" then [$res.ips[]?.address] else [] end),
      macs: (if ($res | type) == "object" then [$res.interfaces[]?.mac] else [] end)
    }' >>"$trace"
} 9>>"$trace"

printf '%s\n' "$out"
exit "$rc"

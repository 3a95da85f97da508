#!/bin/bash
# wg-cni as the clients see it: runs the real binary with the same environment, stdin and
# arguments, passes its stdout and exit code through, and appends one JSON line per call to a
# trace file (what the client sent, what it got back). lib.sh's make_bin_dir fills in the @..@.
#
# Workarounds (only those listed in WORKAROUNDS; none with WGC_STRICT=1), each logged in the
# trace so the harness can report it:
#   version-env  VERSION failed: retry without CNI_NETNS/CNI_IFNAME/CNI_PATH/CNI_CONTAINERID
#                (libcni's ValidateNetworkList probes plugins with CNI_NETNS=dummy)
#   mac          an ADD result interface without "mac" gets "00:00:00:00:00:00" (podman 4.3
#                rejects a result interface without a parseable MAC: "invalid MAC address")
real='@REAL@'
trace='@TRACE@'
workarounds=' @WORKAROUNDS@ '

stdin=$(cat)
run() { printf '%s' "$stdin" | "$@"; }

applied=""
first=""
out=$(run "$real" "$@")
rc=$?
if [ "$rc" != 0 ] && [ "${CNI_COMMAND-}" = VERSION ] && [[ $workarounds == *" version-env "* ]]; then
  first=$out
  out=$(run env -u CNI_NETNS -u CNI_IFNAME -u CNI_PATH -u CNI_CONTAINERID "$real" "$@")
  rc=$?
  [ "$rc" = 0 ] && applied=version-env
fi
if [ "$rc" = 0 ] && [ "${CNI_COMMAND-}" = ADD ] && [[ $workarounds == *" mac "* ]] &&
  printf '%s' "$out" | jq -e 'any(.interfaces[]?; .mac == null)' >/dev/null 2>&1; then
  out=$(printf '%s' "$out" | jq '(.interfaces[]? | select(.mac == null) | .mac) = "00:00:00:00:00:00"')
  applied=mac
fi

{
  flock 9
  jq -nc --arg t "$(date +%s.%N)" --arg cmd "${CNI_COMMAND-}" --arg cid "${CNI_CONTAINERID-}" \
    --arg netns "${CNI_NETNS-}" --arg ifname "${CNI_IFNAME-}" --arg args "${CNI_ARGS-}" \
    --arg path "${CNI_PATH-}" --arg stdin "$stdin" --arg out "$out" --argjson rc "$rc" \
    --arg workaround "$applied" --arg first "$first" '
    ($stdin | fromjson? // {}) as $conf | ($out | fromjson? // {}) as $res |
    ($first | fromjson? // {}) as $firstres | {
      t: ($t | tonumber), cmd: $cmd, containerId: $cid, netns: $netns, ifname: $ifname,
      args: $args, path: $path,
      cniVersion: (if ($conf | type) == "object" then $conf.cniVersion // "" else "" end),
      prevResult: (($conf | type) == "object" and ($conf | has("prevResult"))),
      runtimeConfig: (if ($conf | type) == "object" then $conf.runtimeConfig else null end),
      rc: $rc,
      code: (if ($res | type) == "object" then $res.code else null end),
      msg: (if ($res | type) == "object" then $res.msg else null end),
      ips: (if ($res | type) == "object" then [$res.ips[]?.address] else [] end),
      workaround: (if $workaround == "" then null else $workaround end),
      firstMsg: (if ($firstres | type) == "object" then $firstres.msg else null end)
    }' >>"$trace"
} 9>>"$trace"

printf '%s\n' "$out"
exit "$rc"

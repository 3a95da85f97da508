// wgc-cnitool: cnitool's interface (`add|check|del NET NETNS`) on Debian's libcni 1.1.2, so
// the harness exercises exactly libcni's code path: conflist loading from NETCONFPATH, VERSION
// checks, the result cache, prevResult on CHECK and DEL.
//
// Environment, as cnitool: NETCONFPATH (default /etc/cni/net.d), CNI_PATH, CNI_IFNAME (default
// eth0), CNI_ARGS ("K=V;K=V"), CAP_ARGS (JSON object). Ours: CNI_CACHE_DIR, libcni's cache root
// (default /var/lib/cni; results land in CNI_CACHE_DIR/results/NET-CONTAINERID-IFNAME).
// The container ID is derived from the absolute netns path exactly as cnitool does.
//
// Build offline in GOPATH mode:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o wgc-cnitool .
package main

import (
	"context"
	"crypto/sha512"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

const (
	envCNIPath        = "CNI_PATH"
	envNetDir         = "NETCONFPATH"
	envCapabilityArgs = "CAP_ARGS"
	envCNIArgs        = "CNI_ARGS"
	envCNIIfname      = "CNI_IFNAME"
	envCacheDir       = "CNI_CACHE_DIR"

	defaultNetDir = "/etc/cni/net.d"
	defaultIfname = "eth0"
)

func usage() {
	exe := filepath.Base(os.Args[0])
	fmt.Fprintf(os.Stderr, "%s: add, check or delete a network from a network namespace\n", exe)
	fmt.Fprintf(os.Stderr, "  %s add   <net> <netns>\n", exe)
	fmt.Fprintf(os.Stderr, "  %s check <net> <netns>\n", exe)
	fmt.Fprintf(os.Stderr, "  %s del   <net> <netns>\n", exe)
	os.Exit(2)
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", filepath.Base(os.Args[0]), err)
	os.Exit(1)
}

// parseArgs splits CNI_ARGS like cnitool: "K=V" pairs separated by ';', none empty.
func parseArgs(args string) ([][2]string, error) {
	var result [][2]string
	for _, pair := range strings.Split(args, ";") {
		kv := strings.Split(pair, "=")
		if len(kv) != 2 || kv[0] == "" || kv[1] == "" {
			return nil, fmt.Errorf("invalid CNI_ARGS pair %q", pair)
		}
		result = append(result, [2]string{kv[0], kv[1]})
	}
	return result, nil
}

func main() {
	if len(os.Args) != 4 {
		usage()
	}
	command, netName := os.Args[1], os.Args[2]
	if command != "add" && command != "check" && command != "del" {
		usage()
	}

	netdir := os.Getenv(envNetDir)
	if netdir == "" {
		netdir = defaultNetDir
	}
	netconf, err := libcni.LoadConfList(netdir, netName)
	if err != nil {
		fail(err)
	}

	var capabilityArgs map[string]interface{}
	if s := os.Getenv(envCapabilityArgs); s != "" {
		if err := json.Unmarshal([]byte(s), &capabilityArgs); err != nil {
			fail(fmt.Errorf("%s: %v", envCapabilityArgs, err))
		}
	}
	var cniArgs [][2]string
	if s := os.Getenv(envCNIArgs); s != "" {
		if cniArgs, err = parseArgs(s); err != nil {
			fail(err)
		}
	}
	ifName := os.Getenv(envCNIIfname)
	if ifName == "" {
		ifName = defaultIfname
	}

	netns, err := filepath.Abs(os.Args[3])
	if err != nil {
		fail(err)
	}
	// Like cnitool: the container ID is a hash of the netns path.
	sum := sha512.Sum512([]byte(netns))
	containerID := fmt.Sprintf("cnitool-%x", sum[:10])

	cninet := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(os.Getenv(envCNIPath)),
		os.Getenv(envCacheDir), nil)
	rt := &libcni.RuntimeConf{
		ContainerID:    containerID,
		NetNS:          netns,
		IfName:         ifName,
		Args:           cniArgs,
		CapabilityArgs: capabilityArgs,
	}

	ctx := context.TODO()
	switch command {
	case "add":
		result, err := cninet.AddNetworkList(ctx, netconf, rt)
		if err != nil {
			fail(err)
		}
		if err := result.Print(); err != nil {
			fail(err)
		}
	case "check":
		if err := cninet.CheckNetworkList(ctx, netconf, rt); err != nil {
			fail(err)
		}
	case "del":
		if err := cninet.DelNetworkList(ctx, netconf, rt); err != nil {
			fail(err)
		}
	}
}

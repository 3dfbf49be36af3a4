// Command portway runs a portway gateway or agent, the loopback quick start,
// the status view and the benchmark. See README.md.
package main

import (
	"os"

	"github.com/portway/portway/internal/cli"
)

// version is stamped at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

func main() {
	os.Exit(cli.Main(os.Args[1:], version, os.Stdout, os.Stderr))
}

// Command portway runs a portway gateway or agent, the loopback quick start,
// the status view and the benchmark. See README.md.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/portway/portway/internal/cli"
)

// version and commit are stamped at build time (scripts/release.sh):
// -ldflags "-X main.version=v1.2.3 -X main.commit=0123abc".
var (
	version = "dev"
	commit  = ""
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.MainBuild(ctx, os.Args[1:], cli.Build{Version: version, Commit: commit}, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

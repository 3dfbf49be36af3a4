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

// version is stamped at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Main(ctx, os.Args[1:], version, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// Package quickstart holds the demo backends of `portway up`.
package quickstart

import (
	"context"
	"io"
	"net"
)

// StartEcho starts a TCP echo server on addr that runs until ctx ends. It
// echoes every byte and carries half-close: after the client's FIN it
// finishes echoing, then closes its side.
func StartEcho(ctx context.Context, addr string) (net.Addr, error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	context.AfterFunc(ctx, func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
				if tc, ok := c.(*net.TCPConn); ok {
					tc.CloseWrite()
				}
			}()
		}
	}()
	return ln.Addr(), nil
}

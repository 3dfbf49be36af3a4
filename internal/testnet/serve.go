package testnet

import (
	"net"
	"testing"
)

// ServeTCP listens on a free TCP port of 127.0.0.1 and runs handle, in a
// goroutine of its own, for every connection it accepts, until the test
// ends: then the listener is closed (handle owns, and closes, each
// connection). It returns the listener's address. It is the server side
// of the small scripted backends the tests put behind a tunnel.
func ServeTCP(t testing.TB, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testnet: listening: %v", err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
	return ln.Addr().String()
}

// Package testnet holds the client side of the probes tests send through
// tunnel endpoints, relays and proxies on loopback: today an echo round
// trip with a half-close. For tests only.
package testnet

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"time"
)

const (
	// dialTimeout and ioTimeout are hang guards, not performance bounds.
	dialTimeout = 5 * time.Second
	ioTimeout   = 60 * time.Second
)

// EchoRoundTrip sends payload over TCP to addr, which must lead to an echo
// server, half-closes the connection, and checks that the whole payload and
// then EOF come back.
func EchoRoundTrip(addr string, payload []byte) error {
	c, err := net.DialTimeout("tcp", addr, dialTimeout)
	if err != nil {
		return fmt.Errorf("echo round trip: %w", err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(ioTimeout)); err != nil {
		return fmt.Errorf("echo round trip: %w", err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		errc <- err
	}()
	got, err := io.ReadAll(c)
	if werr := <-errc; werr != nil {
		return fmt.Errorf("echo round trip: write: %w", werr)
	}
	if err != nil {
		return fmt.Errorf("echo round trip: read after %d bytes: %w", len(got), err)
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("echo round trip: echo differs: sent %d bytes, got %d", len(payload), len(got))
	}
	return nil
}

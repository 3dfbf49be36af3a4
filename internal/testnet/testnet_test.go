package testnet

import (
	"io"
	"net"
	"strings"
	"testing"
)

func TestEchoRoundTripThroughAnEcho(t *testing.T) {
	addr := ServeTCP(t, func(c net.Conn) {
		defer c.Close()
		io.Copy(c, c)
	})
	if err := EchoRoundTrip(addr, []byte(strings.Repeat("payload ", 100000))); err != nil {
		t.Fatal(err)
	}
	if err := EchoRoundTrip(addr, nil); err != nil {
		t.Fatalf("empty payload: %v", err)
	}
}

// A server that answers something else, or less, is caught.
func TestEchoRoundTripCatchesAWrongEcho(t *testing.T) {
	for name, handle := range map[string]func(net.Conn){
		"other bytes": func(c net.Conn) {
			defer c.Close()
			b, _ := io.ReadAll(c)
			c.Write([]byte(strings.ToUpper(string(b))))
		},
		"short": func(c net.Conn) {
			defer c.Close()
			b, _ := io.ReadAll(c)
			c.Write(b[:len(b)-1])
		},
	} {
		addr := ServeTCP(t, handle)
		if err := EchoRoundTrip(addr, []byte("hello")); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

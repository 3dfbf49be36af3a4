package testservers_test

import (
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/portway/portway/internal/testservers"
)

// TestHAProxy starts a real HAProxy forwarding two ports to a Go echo
// server and checks that data flows through both, that the connection is
// logged, and that the directory is gone after cleanup.
func TestHAProxy(t *testing.T) {
	t.Parallel()
	echo, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()

	var dir string
	t.Run("server", func(t *testing.T) {
		hp := testservers.HAProxy(t, 2, func(ports []int) string {
			var b strings.Builder
			for i, p := range ports {
				fmt.Fprintf(&b, "listen echo%d\n    option tcplog\n    bind 127.0.0.1:%d\n    server echo %s\n\n", i, p, echo.Addr())
			}
			return b.String()
		})
		dir = hp.Dir
		if len(hp.Ports) != 2 || hp.Ports[0] == hp.Ports[1] || hp.ReadyPort == hp.Ports[0] || hp.ReadyPort == hp.Ports[1] {
			t.Fatalf("ports %v, ready port %d", hp.Ports, hp.ReadyPort)
		}
		for _, p := range hp.Ports {
			c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", fmt.Sprint(p)), 10*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			_ = c.SetDeadline(time.Now().Add(20 * time.Second))
			msg := fmt.Sprintf("hello through port %d", p)
			if _, err := io.WriteString(c, msg); err != nil {
				t.Fatal(err)
			}
			_ = c.(*net.TCPConn).CloseWrite()
			got, err := io.ReadAll(c)
			c.Close()
			if err != nil || string(got) != msg {
				t.Fatalf("echo through HAProxy: %q, %v; want %q", got, err, msg)
			}
		}
		// tcplog lines name the listener; HAProxy writes them when the
		// connection ends, so poll (bounded).
		deadline := time.Now().Add(20 * time.Second)
		for !strings.Contains(hp.Log(t), " echo1 echo1/echo ") {
			if time.Now().After(deadline) {
				t.Fatalf("no tcplog line for echo1:\n%s", hp.Log(t))
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("HAProxy directory %s still exists after cleanup: %v", dir, err)
	}
}

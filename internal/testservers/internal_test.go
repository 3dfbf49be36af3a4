package testservers

import (
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

// TestStartRetriesBusyPort checks that a server whose port was taken between
// FreePort and its bind is restarted on another port.
func TestStartRetriesBusyPort(t *testing.T) {
	server := Require(t, "redis-server", "redis-server")
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	busy := l.Addr().(*net.TCPAddr).Port
	dir := serverDir(t, "redis")
	calls := 0
	p, port := startServer(t, "redis-server",
		func() int {
			calls++
			if calls == 1 {
				return busy
			}
			return FreePort(t, "tcp")
		},
		func(port int) *process {
			cmd := exec.Command(server, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--dir", dir)
			return startProcess(t, "redis-server", cmd, filepath.Join(dir, "redis.log"), syscall.SIGTERM)
		},
		func(port int) error { return RedisPing(hostPort("127.0.0.1", port)) })
	if port == busy || calls != 2 {
		t.Fatalf("got port %d after %d attempts (busy port %d)", port, calls, busy)
	}
	p.Stop(t)
	if !p.Exited() {
		t.Fatal("server still running after stop")
	}
}

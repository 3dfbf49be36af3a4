package testservers

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// HAProxyServer is a running HAProxy started by HAProxy.
type HAProxyServer struct {
	// Ports are the free TCP ports handed to the proxies function, in
	// order, as the caller's listeners use them.
	Ports []int
	// ReadyPort is the port of the starter's own readiness frontend on
	// 127.0.0.1.
	ReadyPort int
	// Dir is the server's private directory (configuration and log).
	Dir string
	// ConfigPath is the configuration file.
	ConfigPath string
	// LogPath receives HAProxy's stdout and stderr, its traffic log
	// included.
	LogPath string
}

// HAProxy starts a real haproxy (Debian package "haproxy") in the foreground
// with the proxy sections (frontend, backend, listen) that proxies returns
// for nPorts free TCP ports. The ports are chosen free on 127.0.0.1; a
// section may bind them on [::1] too. The starter writes the global and
// defaults sections itself: one thread, mode tcp, 5s connect and 30s
// client/server timeouts, and "log global" to stdout in the server's log
// file, so a section with "option tcplog" or "option httplog" logs each
// connection there. It adds a readiness frontend on a port of its own and
// waits (bounded) until that answers an HTTP request. HAProxy is stopped and
// its directory removed by t.Cleanup. When a port was taken between choosing
// and binding, it starts again with new ports.
func HAProxy(t testing.TB, nPorts int, proxies func(ports []int) string) *HAProxyServer {
	t.Helper()
	bin := Require(t, "haproxy", "haproxy")
	dir := serverDir(t, "haproxy")
	s := &HAProxyServer{Dir: dir, ConfigPath: filepath.Join(dir, "haproxy.cfg"), LogPath: filepath.Join(dir, "haproxy.log")}
	_, ready := startServer(t, "haproxy", func() int { return FreePort(t, "tcp") },
		func(readyPort int) *process {
			s.Ports = make([]int, nPorts)
			for i := range s.Ports {
				s.Ports[i] = FreePort(t, "tcp")
			}
			cfg := haproxyConfig(readyPort, proxies(s.Ports))
			if err := os.WriteFile(s.ConfigPath, []byte(cfg), 0o644); err != nil {
				t.Fatalf("testservers: haproxy: %v", err)
			}
			// -db: stay in the foreground, no master/worker.
			cmd := exec.Command(bin, "-db", "-f", s.ConfigPath)
			cmd.Dir = dir
			return startProcess(t, "haproxy", cmd, s.LogPath, syscall.SIGTERM)
		},
		func(readyPort int) error { return haproxyReady(hostPort("127.0.0.1", readyPort)) })
	s.ReadyPort = ready
	return s
}

// haproxyConfig is the full configuration: global and defaults, the
// readiness frontend, then the caller's sections.
func haproxyConfig(readyPort int, proxies string) string {
	return fmt.Sprintf(`# Written by portway's internal/testservers.
global
    nbthread 1
    maxconn 256
    log stdout format raw local0 info

defaults
    log global
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend testservers_ready
    mode http
    no log
    bind 127.0.0.1:%d
    http-request return status 200 content-type text/plain string ready

%s
`, readyPort, proxies)
}

// haproxyReady sends an HTTP request to the readiness frontend and expects
// a 200.
func haproxyReady(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("GET / HTTP/1.0\r\nHost: ready\r\n\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if f := strings.Fields(line); len(f) < 2 || f[1] != "200" {
		return fmt.Errorf("readiness frontend answered %q", strings.TrimSpace(line))
	}
	return nil
}

// Log returns the server's log so far (its traffic log lines included).
func (s *HAProxyServer) Log(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile(s.LogPath)
	if err != nil {
		t.Fatalf("testservers: haproxy log: %v", err)
	}
	return string(b)
}

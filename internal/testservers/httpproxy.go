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

// HTTPProxy is a running tinyproxy HTTP proxy started by StartHTTPProxy.
type HTTPProxy struct {
	// Port is the port the proxy listens on, on 127.0.0.1.
	Port int
	// LogPath is the file receiving the proxy's log (each CONNECT is
	// logged).
	LogPath string
}

// StartHTTPProxy starts the real tinyproxy (/usr/bin/tinyproxy, Debian
// package "tinyproxy-bin") in the foreground on 127.0.0.1:<free port>,
// accepting clients from 127.0.0.1 only and CONNECT to any port. Readiness
// is a real request answered by the proxy. The proxy is stopped by
// t.Cleanup.
func StartHTTPProxy(t testing.TB) *HTTPProxy {
	t.Helper()
	bin := Require(t, "tinyproxy", "tinyproxy-bin")
	dir := serverDir(t, "tinyproxy")
	p := &HTTPProxy{LogPath: filepath.Join(dir, "tinyproxy.log")}
	_, p.Port = startServer(t, "tinyproxy", func() int { return FreePort(t, "tcp") },
		func(port int) *process {
			conf := filepath.Join(dir, "tinyproxy.conf")
			// No ConnectPort line: CONNECT is allowed to every port.
			content := fmt.Sprintf("Port %d\nListen 127.0.0.1\nTimeout 60\nMaxClients 64\nAllow 127.0.0.1\n"+
				"LogFile %q\nLogLevel Info\nDisableViaHeader Yes\n", port, p.LogPath)
			if os.Geteuid() == 0 {
				// tinyproxy refuses to keep root unless told which user
				// to run as; nothing to protect in a test.
				content += "User root\nGroup root\n"
			}
			if err := os.WriteFile(conf, []byte(content), 0o644); err != nil {
				t.Fatalf("testservers: tinyproxy: %v", err)
			}
			cmd := exec.Command(bin, "-d", "-c", conf)
			cmd.Dir = dir
			return startProcess(t, "tinyproxy", cmd, filepath.Join(dir, "tinyproxy.out"), syscall.SIGTERM)
		},
		func(port int) error {
			// A request that is not for proxying: any HTTP answer (an
			// error page) means it is serving.
			c, err := net.DialTimeout("tcp", hostPort("127.0.0.1", port), time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Second))
			fmt.Fprint(c, "GET / HTTP/1.0\r\n\r\n")
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil {
				return err
			}
			if !strings.HasPrefix(line, "HTTP/1.") {
				return fmt.Errorf("answered %q", line)
			}
			return nil
		})
	return p
}

// URL returns the proxy's URL, for HTTP_PROXY.
func (p *HTTPProxy) URL() string { return "http://" + hostPort("127.0.0.1", p.Port) }

// Log returns what the proxy logged so far.
func (p *HTTPProxy) Log() string {
	b, _ := os.ReadFile(p.LogPath)
	return string(b)
}

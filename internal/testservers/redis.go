package testservers

import (
	"bufio"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// RedisServer is a running Redis server started by Redis.
type RedisServer struct {
	// Host is the address the server listens on: "127.0.0.1" unless
	// started by RedisOn.
	Host string
	// Port is the TCP port the server listens on.
	Port int
	// Dir is the server's working directory.
	Dir string
	// LogPath is the file receiving the server's stdout and stderr.
	LogPath string

	cli string
}

// Redis starts a real redis-server (Debian package "redis-server") on
// 127.0.0.1:<free port> without persistence (save "", appendonly no) and with
// protected mode off, configured entirely on the command line. It is stopped
// and its directory removed by t.Cleanup. redis-cli (package "redis-tools")
// is required as well, for CLI.
func Redis(t testing.TB) *RedisServer {
	t.Helper()
	return RedisOn(t, "127.0.0.1")
}

// RedisOn is Redis listening on host, an IPv4 address of this machine other
// than 127.0.0.1 (such as a pod-like address added to the loopback interface
// of a test's own network namespace).
func RedisOn(t testing.TB, host string) *RedisServer {
	t.Helper()
	server := Require(t, "redis-server", "redis-server")
	cli := Require(t, "redis-cli", "redis-tools")
	dir := serverDir(t, "redis")
	logPath := filepath.Join(dir, "redis.log")
	s := &RedisServer{Host: host, Dir: dir, LogPath: logPath, cli: cli}
	_, port := startServer(t, "redis-server", func() int { return freePortOn(t, "tcp", host) },
		func(port int) *process {
			cmd := exec.Command(server,
				"--port", strconv.Itoa(port),
				"--bind", host,
				"--save", "",
				"--appendonly", "no",
				"--dir", dir,
				"--protected-mode", "no",
				"--daemonize", "no",
				"--logfile", "",
				"--loglevel", "notice",
			)
			cmd.Dir = dir
			return startProcess(t, "redis-server", cmd, logPath, syscall.SIGTERM)
		},
		func(port int) error { return RedisPing(hostPort(host, port)) })
	s.Port = port
	return s
}

// RedisPing sends a RESP PING to addr on a connection of its own and
// expects +PONG.
func RedisPing(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("*1\r\n$4\r\nPING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != "+PONG" {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

// Addr returns "<host>:<port>" of the server.
func (s *RedisServer) Addr() string { return hostPort(s.Host, s.Port) }

// CLI runs the real redis-cli against host:port (the server itself or a
// tunnel endpoint leading to it) with args (e.g. "SET", "k", "v") and returns
// its stdout. Note that redis-cli exits 0 for Redis error replies; those show
// up in the output as "(error) ..." or, when not on a terminal, "ERR ...".
func (s *RedisServer) CLI(t testing.TB, host string, port int, args ...string) ([]byte, error) {
	t.Helper()
	full := append([]string{"-h", host, "-p", strconv.Itoa(port)}, args...)
	env := cleanEnv([]string{"REDISCLI_"}, "REDISCLI_HISTFILE=/dev/null")
	return runClient(t, env, s.cli, full...)
}

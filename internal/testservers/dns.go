package testservers

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// DNSServer is a running dnsmasq DNS server started by DNS.
type DNSServer struct {
	// Host is the address the server listens on: "127.0.0.1" unless
	// started by DNSOn.
	Host string
	// Port is the port the server listens on, both UDP and TCP.
	Port int
	// Dir is the server's private directory.
	Dir string
	// LogPath is the file receiving the server's output (queries are logged).
	LogPath string

	dig string
}

// TXTPrefix marks a record value passed to DNS as TXT text instead of an
// address: records["name"] = "txt:some text".
const TXTPrefix = "txt:"

// readyName is a TXT record every DNS server answers, used for readiness.
const readyName = "ready.testservers.invalid"

// DNS starts the real dnsmasq (/usr/sbin/dnsmasq, Debian package
// "dnsmasq-base") in the foreground on 127.0.0.1:<free port> (UDP and TCP),
// authoritative only for records and with no upstream servers (names it does
// not know are REFUSED). Each record maps a name to an IPv4 address (A
// record), an IPv6 address (AAAA record) or, when the value starts with
// TXTPrefix ("txt:"), to the text of a TXT record (commas in the text split it
// into several strings, as in dnsmasq's --txt-record). Records are exact-name
// only. dig (package "dnsutils") is required as well; readiness is a real dig
// query. The server is stopped by t.Cleanup.
func DNS(t testing.TB, records map[string]string) *DNSServer {
	t.Helper()
	return DNSOn(t, "127.0.0.1", records)
}

// DNSOn is DNS listening on host, an IPv4 address of this machine other than
// 127.0.0.1 (such as a Service-like address added to the loopback interface
// of a test's own network namespace).
func DNSOn(t testing.TB, host string, records map[string]string) *DNSServer {
	t.Helper()
	dnsmasq := Require(t, "dnsmasq", "dnsmasq-base")
	dig := Require(t, "dig", "dnsutils")

	names := make([]string, 0, len(records))
	for n := range records {
		names = append(names, n)
	}
	sort.Strings(names)
	var recordArgs []string
	for _, name := range names {
		v := records[name]
		clean := strings.TrimSuffix(name, ".")
		switch {
		case strings.HasPrefix(v, TXTPrefix):
			recordArgs = append(recordArgs, "--txt-record="+clean+","+strings.TrimPrefix(v, TXTPrefix))
		case net.ParseIP(v) != nil:
			recordArgs = append(recordArgs, "--host-record="+clean+","+v)
		default:
			t.Fatalf("testservers: DNS: record %q: value %q is neither an IP address nor %q-prefixed text", name, v, TXTPrefix)
		}
	}
	recordArgs = append(recordArgs, "--txt-record="+readyName+",ready")

	dir := serverDir(t, "dnsmasq")
	logPath := filepath.Join(dir, "dnsmasq.log")
	s := &DNSServer{Host: host, Dir: dir, LogPath: logPath, dig: dig}
	_, port := startServer(t, "dnsmasq", func() int { return freeTCPUDPPort(t, host) },
		func(port int) *process {
			args := []string{
				"--keep-in-foreground",
				"--conf-file=/dev/null",
				"--port=" + strconv.Itoa(port),
				"--listen-address=" + host,
				"--bind-interfaces",
				"--no-resolv",
				"--no-hosts",
				"--no-poll",
				"--no-negcache",
				"--pid-file=",
				"--log-facility=-",
				"--log-queries",
			}
			if os.Geteuid() == 0 {
				// dnsmasq drops root to --user/--group after binding. Stay
				// root: nothing to protect in a test, and it needs no
				// dnsmasq/dip user or group to exist.
				args = append(args, "--user=root", "--group=root")
			}
			args = append(args, recordArgs...)
			cmd := exec.Command(dnsmasq, args...)
			cmd.Dir = dir
			return startProcess(t, "dnsmasq", cmd, logPath, syscall.SIGTERM)
		},
		func(port int) error {
			ans, err := s.Dig(t, host, port, readyName, "TXT")
			if err != nil {
				return err
			}
			if len(ans) != 1 || ans[0] != `"ready"` {
				return fmt.Errorf("readiness query answered %q", ans)
			}
			return nil
		})
	s.Port = port
	return s
}

// Addr returns "<host>:<port>" of the server.
func (s *DNSServer) Addr() string { return hostPort(s.Host, s.Port) }

// Dig runs the real dig client against server:port (the server itself or a
// tunnel endpoint leading to it):
//
//	dig -r +short +tries=1 +time=2 @server -p port [opts...] name qtype
//
// (-r ignores ~/.digrc) and returns the non-empty answer lines; comment lines
// starting with ";" are dropped. TXT answers keep dig's quoting, e.g.
// `"hello"`. opts are extra dig options such as "+tcp" (useful through a TCP
// tunnel). An empty answer (unknown name: REFUSED, or no record of qtype) is
// not an error; no answer at all (timeout) is.
func (s *DNSServer) Dig(t testing.TB, server string, port int, name, qtype string, opts ...string) ([]string, error) {
	t.Helper()
	args := []string{"-r", "+short", "+tries=1", "+time=2", "@" + server, "-p", strconv.Itoa(port)}
	args = append(args, opts...)
	args = append(args, name, qtype)
	out, err := runClient(t, cleanEnv(nil), s.dig, args...)
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, ";") {
			continue
		}
		lines = append(lines, l)
	}
	if err != nil {
		return lines, fmt.Errorf("%w: %s", err, strings.TrimSpace(string(out)))
	}
	return lines, nil
}

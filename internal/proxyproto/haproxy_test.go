package proxyproto_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/portway/portway/internal/proxyproto"
	"github.com/portway/portway/internal/testservers"
)

// hangGuard bounds every network operation of these tests; it only turns a
// hang into a failure.
const hangGuard = 20 * time.Second

func ipv6Loopback() bool {
	l, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		return false
	}
	l.Close()
	return true
}

// TestHAProxyAcceptsHeaders writes headers made by AppendV1 and AppendV2 to
// a real HAProxy listening with accept-proxy, and checks that HAProxy took
// exactly the advertised source and destination as the connection's
// addresses: it answers with its src, src_port, dst and dst_port fetches,
// and logs the client address it saw.
func TestHAProxyAcceptsHeaders(t *testing.T) {
	t.Parallel()
	hp := testservers.HAProxy(t, 1, func(ports []int) string {
		return fmt.Sprintf(`frontend accept_proxy
    mode http
    log-format "portway-test client=%%ci:%%cp"
    bind 127.0.0.1:%d accept-proxy
    http-request return status 200 content-type text/plain lf-string "%%[src] %%[src_port] %%[dst] %%[dst_port]"
`, ports[0])
	})
	addr := net.JoinHostPort("127.0.0.1", fmt.Sprint(hp.Ports[0]))
	ap := netip.MustParseAddrPort

	// real means: HAProxy must fall back to the TCP connection's own
	// addresses (LOCAL, UNKNOWN).
	const real = "real"
	var logged []string // client addresses HAProxy must have logged
	defer func() {
		// HAProxy logs a stream when it ends, so poll (bounded).
		deadline := time.Now().Add(hangGuard)
		for _, want := range logged {
			for !strings.Contains(hp.Log(t), "portway-test client="+want+"\n") {
				if time.Now().After(deadline) {
					t.Fatalf("HAProxy did not log client %s\n--- haproxy log ---\n%s", want, hp.Log(t))
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
	}()
	for _, tc := range []struct {
		name string
		hdr  []byte
		want string
	}{
		{"v1 tcp4", proxyproto.AppendV1(nil, ap("127.0.0.7:40001"), ap("127.0.0.1:5432")), "127.0.0.7 40001 127.0.0.1 5432"},
		{"v2 tcp4", proxyproto.AppendV2(nil, proxyproto.TransportStream, ap("127.0.0.7:40002"), ap("127.0.0.1:5432")), "127.0.0.7 40002 127.0.0.1 5432"},
		{"v1 tcp6", proxyproto.AppendV1(nil, ap("[::1]:40003"), ap("[2001:db8::1]:443")), "::1 40003 2001:db8::1 443"},
		{"v2 tcp6", proxyproto.AppendV2(nil, proxyproto.TransportStream, ap("[::1]:40004"), ap("[2001:db8::1]:443")), "::1 40004 2001:db8::1 443"},
		{"v1 mapped client", proxyproto.AppendV1(nil, ap("[::ffff:127.0.0.7]:40005"), ap("127.0.0.1:22")), "127.0.0.7 40005 127.0.0.1 22"},
		{"v2 mapped client", proxyproto.AppendV2(nil, proxyproto.TransportStream, ap("[::ffff:127.0.0.7]:40006"), ap("[::ffff:127.0.0.1]:22")), "127.0.0.7 40006 127.0.0.1 22"},
		{"v2 mixed families", proxyproto.AppendV2(nil, proxyproto.TransportStream, ap("[::1]:40007"), ap("127.0.0.1:22")), "::1 40007 ::ffff:127.0.0.1 22"},
		{"v1 mixed families is UNKNOWN", proxyproto.AppendV1(nil, ap("[::1]:40008"), ap("127.0.0.1:22")), real},
		{"v2 local", proxyproto.AppendV2Local(nil), real},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.DialTimeout("tcp", addr, hangGuard)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(hangGuard))
			// The header and the request in separate writes, as the
			// agent will send them.
			if _, err := c.Write(tc.hdr); err != nil {
				t.Fatal(err)
			}
			if _, err := io.WriteString(c, "GET / HTTP/1.0\r\nHost: test\r\n\r\n"); err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatalf("reading HAProxy's response: %v\n--- haproxy log ---\n%s", err, hp.Log(t))
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatal(err)
			}
			want := tc.want
			if want == real {
				l, r := c.LocalAddr().(*net.TCPAddr), c.RemoteAddr().(*net.TCPAddr)
				want = fmt.Sprintf("%s %d %s %d", l.IP, l.Port, r.IP, r.Port)
			}
			if resp.StatusCode != http.StatusOK || string(body) != want {
				t.Fatalf("HAProxy saw %d %q, want %q\n--- haproxy log ---\n%s", resp.StatusCode, body, want, hp.Log(t))
			}
			f := strings.Fields(want)
			logged = append(logged, f[0]+":"+f[1])
		})
	}
}

// TestHAProxySendsHeaders puts a real HAProxy with send-proxy and
// send-proxy-v2 in front of a Go listener that reads the header with Read
// or ReadBuffered: a client bound to 127.0.0.7 (and ::1) connects through
// HAProxy, the parser must yield the client's address and HAProxy's
// listening address, and the client's data after the header must arrive
// intact, as must the reply.
func TestHAProxySendsHeaders(t *testing.T) {
	t.Parallel()
	backend, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer backend.Close()
	bport := backend.Addr().(*net.TCPAddr).Port
	v6 := ipv6Loopback()

	type listener struct {
		name    string
		version int
		bind    string // host HAProxy listens on
		client  string // address the client binds to
	}
	listeners := []listener{
		{"send-proxy", 1, "127.0.0.1", "127.0.0.7"},
		{"send-proxy-v2", 2, "127.0.0.1", "127.0.0.7"},
	}
	if v6 {
		listeners = append(listeners,
			listener{"send-proxy", 1, "::1", "::1"},
			listener{"send-proxy-v2", 2, "::1", "::1"})
	} else {
		t.Log("no IPv6 loopback: IPv6 clients not tested")
	}
	hp := testservers.HAProxy(t, len(listeners), func(ports []int) string {
		var b strings.Builder
		for i, l := range listeners {
			fmt.Fprintf(&b, "listen l%d\n    option tcplog\n    bind %s\n    server backend 127.0.0.1:%d %s\n\n",
				i, net.JoinHostPort(l.bind, fmt.Sprint(ports[i])), bport, l.name)
		}
		return b.String()
	})

	payload := make([]byte, 256<<10)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}
	// Starting the client's data with what looks like a header makes sure
	// the parser stops at the real one.
	copy(payload, "PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n")

	for i, l := range listeners {
		for _, buffered := range []bool{false, true} {
			name := fmt.Sprintf("%s from %s/buffered=%v", l.name, l.client, buffered)
			t.Run(name, func(t *testing.T) {
				front := netip.AddrPortFrom(netip.MustParseAddr(l.bind), uint16(hp.Ports[i]))
				d := net.Dialer{Timeout: hangGuard, LocalAddr: &net.TCPAddr{IP: net.ParseIP(l.client)}}
				c, err := d.Dial("tcp", front.String())
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(hangGuard))
				client := netip.MustParseAddrPort(c.LocalAddr().String())
				sent := make(chan error, 1)
				go func() {
					_, err := c.Write(payload)
					if err == nil {
						err = c.(*net.TCPConn).CloseWrite()
					}
					sent <- err
				}()

				_ = backend.(*net.TCPListener).SetDeadline(time.Now().Add(hangGuard))
				s, err := backend.Accept()
				if err != nil {
					t.Fatalf("accept: %v\n--- haproxy log ---\n%s", err, hp.Log(t))
				}
				defer s.Close()
				_ = s.SetDeadline(time.Now().Add(hangGuard))
				var (
					h    proxyproto.Header
					rest io.Reader = s
				)
				if buffered {
					br := bufio.NewReader(s)
					h, err = proxyproto.ReadBuffered(br)
					rest = br
				} else {
					h, err = proxyproto.Read(s)
				}
				if err != nil {
					t.Fatalf("reading the header HAProxy sent: %v", err)
				}
				want := proxyproto.Header{
					Version: l.version, Command: proxyproto.CommandProxy, Transport: proxyproto.TransportStream,
					Source: client, Destination: front,
				}
				if h != want {
					t.Fatalf("header %+v, want %+v", h, want)
				}
				got, err := io.ReadAll(rest)
				if err != nil {
					t.Fatalf("reading the client's data: %v", err)
				}
				if !bytes.Equal(got, payload) {
					t.Fatalf("client data after the header: %d bytes, want the %d sent (first bytes %q)", len(got), len(payload), got[:min(len(got), 40)])
				}
				if err := <-sent; err != nil {
					t.Fatalf("client write: %v", err)
				}
				if _, err := io.WriteString(s, "reply"); err != nil {
					t.Fatal(err)
				}
				s.Close()
				if r, err := io.ReadAll(c); err != nil || string(r) != "reply" {
					t.Fatalf("client read %q, %v; want the reply", r, err)
				}
			})
		}
	}
}

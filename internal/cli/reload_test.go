//go:build unix

package cli

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/portway/portway/internal/testlog"
	"github.com/portway/portway/internal/testwait"
)

// testCA signs the gateway's certificates in the reload tests.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "portway test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// leaf writes a certificate for 127.0.0.1 with the given serial, signed by
// the CA, to certFile and keyFile, each replaced by a rename as renewal
// tools do.
func (ca *testCA) leaf(t *testing.T, serial int64, notAfter time.Time, certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: notAfter,
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writeAtomic(t, certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	writeAtomic(t, keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}))
}

// writeAtomic replaces path by a rename, so a poll never reads half a file.
func writeAtomic(t *testing.T, path string, b []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// echoServer is the backend: it echoes every connection until the test
// ends.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				io.Copy(c, c)
				c.Close()
			}()
		}
	}()
	return ln.Addr().String()
}

// streamer keeps one client connection busy through the tunnel: a line
// out, the same line back, every few milliseconds, until stopped or the
// first failure.
type streamer struct {
	ok   atomic.Int64
	err  atomic.Pointer[error]
	stop chan struct{}
	done chan struct{}
}

func startStreamer(t *testing.T, addr string) *streamer {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	s := &streamer{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		defer c.Close()
		r := bufio.NewReader(c)
		for i := 0; ; i++ {
			select {
			case <-s.stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			want := fmt.Sprintf("line %d\n", i)
			_, err := io.WriteString(c, want)
			var got string
			if err == nil {
				got, err = r.ReadString('\n')
			}
			if err == nil && got != want {
				err = fmt.Errorf("echo %q, want %q", got, want)
			}
			if err != nil {
				s.err.Store(&err)
				return
			}
			s.ok.Add(1)
		}
	}()
	t.Cleanup(func() {
		close(s.stop)
		<-s.done
	})
	return s
}

func (s *streamer) failed() error {
	if p := s.err.Load(); p != nil {
		return *p
	}
	return nil
}

// alive checks that the stream has not failed and still moves: 20 more
// round trips within a generous bound.
func (s *streamer) alive(t *testing.T, what string) {
	t.Helper()
	start := s.ok.Load()
	for deadline := time.Now().Add(15 * time.Second); s.ok.Load() < start+20; {
		if err := s.failed(); err != nil {
			t.Fatalf("%s: stream broke: %v", what, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: stream stalled at %d round trips", what, s.ok.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// servedSerial returns the serial of the certificate a new handshake with
// the gateway gets.
func servedSerial(t *testing.T, addr string, roots *x509.CertPool) int64 {
	t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"})
	if err != nil {
		t.Fatalf("TLS handshake with the gateway: %v", err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
}

// tunnelStatus returns the status of a (non-upgrade) request to the
// tunnel endpoint with token: 401 for a refused token, 400 (no upgrade)
// for an accepted one.
func tunnelStatus(t *testing.T, url, token string, roots *x509.CertPool) int {
	t.Helper()
	cl := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: roots}, DisableKeepAlives: true}}
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := cl.Do(req)
	if err != nil {
		t.Fatalf("request to %s: %v", url, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// runMain runs the command line in the background until the test ends.
func runMain(t *testing.T, args ...string) *testlog.Buffer {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var out, errOut testlog.Buffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		if code := Main(ctx, args, "test", &out, &errOut); code != 0 {
			t.Errorf("portway %v: exit %d\n%s", args, code, errOut.String())
		}
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Errorf("portway %v did not stop within 30s", args)
		}
	})
	return &errOut
}

func endpointOf(t *testing.T, log *testlog.Buffer, service string) string {
	t.Helper()
	re := regexp.MustCompile(`"msg":"endpoint ready","service":"` + regexp.QuoteMeta(service) + `","protocol":"tcp","endpoint":"([^"]+)"`)
	var m []string
	testwait.For(t, 15*time.Second, "endpoint of "+service+" logged", func() bool {
		m = re.FindStringSubmatch(log.String())
		return m != nil
	})
	return m[1]
}

// TestLiveReloadRotation rotates a token and the certificate of a running
// gateway while clients stream through two agents' tunnels, as an operator
// would: edit the files, send SIGHUP or let the poll notice. The streams
// survive, new handshakes get the new certificate, a removed token stops
// working and its agent's session is closed while the other agent's is
// untouched, an invalid config changes nothing, and an agent reloads its
// static services without dropping the unchanged one's connection.
func TestLiveReloadRotation(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t)
	caFile := filepath.Join(dir, "ca.pem")
	writeAtomic(t, caFile, ca.pem)
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	certFile, keyFile := filepath.Join(dir, "gw.crt"), filepath.Join(dir, "gw.key")
	ca.leaf(t, 101, time.Now().Add(24*time.Hour), certFile, keyFile)
	backend := echoServer(t)

	tokA, tokB, tokC := "alpha-old-token-0123456789", "alpha-new-token-0123456789", "beta-token-0123456789abc"
	gwFile := filepath.Join(dir, "gateway.yaml")
	gwConfig := func(extra, alpha string, withBeta bool) []byte {
		s := fmt.Sprintf(`listen: 127.0.0.1:0
public_host: 127.0.0.1
bind_address: 127.0.0.1
port_range: 41000-41999
state_file: ""
auth_failures_per_minute: 1000
tls: {cert_file: %q, key_file: %q}
%s
agents:
  - {name: alpha, %s}
`, certFile, keyFile, extra, alpha)
		if withBeta {
			s += fmt.Sprintf("  - {name: beta, token_sha256: %s}\n", sha256Hex(tokC))
		}
		return []byte(s)
	}
	writeAtomic(t, gwFile, gwConfig("", "token_sha256: "+sha256Hex(tokA), true))
	gwLog := runMain(t, "--log-format", "json", "gateway", "--config", gwFile, "--watch-interval", "50ms")
	waitFor(t, gwLog, "live reload ready")
	m := regexp.MustCompile(`"agents_url":"wss://([^"/]+)(/[^"]*)"`).FindStringSubmatch(gwLog.String())
	if m == nil {
		t.Fatalf("no agents_url in:\n%s", gwLog.String())
	}
	gwAddr, tunnelURL := m[1], "https://"+m[1]+m[2]

	agentConfig := func(token string, services ...string) []byte {
		s := fmt.Sprintf("gateway: {url: %q, token: %q, ca_file: %q}\nmetrics: {listen: \"\"}\nservices:\n",
			"wss://"+gwAddr+m[2], token, caFile)
		for _, svc := range services {
			s += fmt.Sprintf("  - {name: %s, protocol: tcp, port: 7, backend: %q}\n", svc, backend)
		}
		return []byte(s)
	}
	alphaFile, betaFile := filepath.Join(dir, "alpha.yaml"), filepath.Join(dir, "beta.yaml")
	writeAtomic(t, alphaFile, agentConfig(tokA, "echo-a"))
	writeAtomic(t, betaFile, agentConfig(tokC, "echo-b"))
	alphaLog := runMain(t, "--log-format", "json", "agent", "--config", alphaFile)
	// beta reloads on SIGHUP only.
	betaLog := runMain(t, "--log-format", "json", "agent", "--config", betaFile, "--watch-interval", "0")
	streamA := startStreamer(t, endpointOf(t, alphaLog, "echo-a"))
	streamB := startStreamer(t, endpointOf(t, betaLog, "echo-b"))
	streamA.alive(t, "alpha before any reload")
	streamB.alive(t, "beta before any reload")
	waitFor(t, alphaLog, "live reload ready")
	waitFor(t, betaLog, "live reload ready")
	if got := servedSerial(t, gwAddr, roots); got != 101 {
		t.Fatalf("gateway serves certificate %d, want 101", got)
	}

	// 1. A renewed certificate and alpha's next token, then SIGHUP (the
	//    poll may see the files first; either way no restart).
	ca.leaf(t, 102, time.Now().Add(48*time.Hour), certFile, keyFile)
	writeAtomic(t, gwFile, gwConfig("", "token_sha256: "+sha256Hex(tokA)+", token_sha256_next: "+sha256Hex(tokB), true))
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 15*time.Second, "new handshakes get the renewed certificate", func() bool { return servedSerial(t, gwAddr, roots) == 102 })
	testwait.For(t, 15*time.Second, "alpha's next token is accepted", func() bool { return tunnelStatus(t, tunnelURL, tokB, roots) == http.StatusBadRequest })
	if got := tunnelStatus(t, tunnelURL, tokA, roots); got != http.StatusBadRequest {
		t.Fatalf("alpha's current token during the rotation: HTTP %d, want 400 (accepted, no upgrade)", got)
	}
	streamA.alive(t, "alpha after the certificate and token_sha256_next reload")
	streamB.alive(t, "beta after the certificate and token_sha256_next reload")

	// 2. The old token removed (noticed by the poll): alpha's session,
	//    which used it, is closed; beta's is untouched.
	writeAtomic(t, gwFile, gwConfig("", "token_sha256: "+sha256Hex(tokB), true))
	testwait.For(t, 15*time.Second, "alpha's old token refused", func() bool { return tunnelStatus(t, tunnelURL, tokA, roots) == http.StatusUnauthorized })
	testwait.For(t, 15*time.Second, "alpha's stream ends with its session", func() bool { return streamA.failed() != nil })
	waitFor(t, gwLog, "its token was removed from the configuration")
	if got := tunnelStatus(t, tunnelURL, tokB, roots); got != http.StatusBadRequest {
		t.Fatalf("alpha's new token after the rotation: HTTP %d, want 400", got)
	}
	streamB.alive(t, "beta after alpha's old token was removed")

	// 3. An invalid config (bad max_services, and beta removed) changes
	//    nothing: beta keeps its session and its token works.
	fails := strings.Count(gwLog.String(), "reload failed")
	writeAtomic(t, gwFile, gwConfig("max_services: 0", "token_sha256: "+sha256Hex(tokB), false))
	testwait.For(t, 15*time.Second, "the invalid reload is logged", func() bool { return strings.Count(gwLog.String(), "reload failed") > fails })
	line := lastLine(gwLog.String(), "reload failed")
	if !strings.Contains(line, "max_services") || !strings.Contains(line, "configuration unchanged") {
		t.Fatalf("failed reload log does not name the key: %s", line)
	}
	if got := tunnelStatus(t, tunnelURL, tokC, roots); got != http.StatusBadRequest {
		t.Fatalf("beta's token after an invalid reload: HTTP %d, want 400", got)
	}
	streamB.alive(t, "beta after an invalid reload")

	// 4. beta gains a service on SIGHUP; its unchanged service keeps its
	//    connection, and the process lives on.
	writeAtomic(t, betaFile, agentConfig(tokC, "echo-b", "echo-b2"))
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	streamB2 := startStreamer(t, endpointOf(t, betaLog, "echo-b2"))
	streamB2.alive(t, "beta's added service")
	streamB.alive(t, "beta's unchanged service after its agent reloaded")
}

// lastLine returns the last line of s containing substr.
func lastLine(s, substr string) string {
	lines := strings.Split(s, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], substr) {
			return lines[i]
		}
	}
	return ""
}

// TestApplyLogLevel: a config's log_level sets the level live, removing it
// returns to --log-level's value, and an explicit --log-level wins.
func TestApplyLogLevel(t *testing.T) {
	a := &app{logLevel: "info", logFormat: "text", stderr: io.Discard}
	log, err := a.logger()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if log.Enabled(ctx, slog.LevelDebug) {
		t.Fatal("debug enabled at info")
	}
	a.applyLogLevel("debug", false)
	if !log.Enabled(ctx, slog.LevelDebug) {
		t.Fatal("log_level: debug did not enable debug on the running logger")
	}
	a.applyLogLevel("", false)
	if log.Enabled(ctx, slog.LevelDebug) {
		t.Fatal("removing log_level did not return to --log-level")
	}
	a.applyLogLevel("debug", true)
	if log.Enabled(ctx, slog.LevelDebug) {
		t.Fatal("log_level overrode an explicit --log-level")
	}
}

// TestAgentStartFailureEndsReloadLoop: an agent that fails after its
// reload loop started (here its metrics address is taken) still exits.
func TestAgentStartFailureEndsReloadLoop(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	var out, errOut testlog.Buffer
	done := make(chan int, 1)
	go func() {
		done <- Main(context.Background(), []string{"agent", "--gateway-url", "ws://127.0.0.1:1/v1/tunnel",
			"--token", "agent-token-0123456789", "--metrics-listen", taken.Addr().String()}, "test", &out, &errOut)
	}()
	select {
	case code := <-done:
		if code == 0 {
			t.Fatalf("agent with a taken metrics address exited 0:\n%s", errOut.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("agent did not exit after failing to start:\n%s", errOut.String())
	}
}

// The gateway command watches agents_file like its config: a line added
// to the file admits that agent without a restart or a signal, and one
// removed is refused again.
func TestGatewayPollsTheAgentsFile(t *testing.T) {
	dir := t.TempDir()
	tokA, tokB := "alpha-token-0123456789abcdef", "beta-token-0123456789abcdef"
	agentsFile, gwFile := filepath.Join(dir, "agents"), filepath.Join(dir, "gateway.yaml")
	writeAtomic(t, agentsFile, []byte("alpha sha256:"+sha256Hex(tokA)+"\n"))
	writeAtomic(t, gwFile, []byte(fmt.Sprintf("listen: 127.0.0.1:0\npublic_host: 127.0.0.1\nbind_address: 127.0.0.1\nstate_file: \"\"\ninsecure: true\nauth_failures_per_minute: 1000\nagents_file: %q\n", agentsFile)))
	gwLog := runMain(t, "--log-format", "json", "gateway", "--config", gwFile, "--watch-interval", "50ms")
	waitFor(t, gwLog, "live reload ready")
	m := regexp.MustCompile(`"agents_url":"ws://([^"]+)"`).FindStringSubmatch(gwLog.String())
	if m == nil {
		t.Fatalf("no agents_url in:\n%s", gwLog.String())
	}
	url := "http://" + m[1]
	// 400: the token is accepted and the plain GET is refused as no
	// upgrade; 401: the token is unknown.
	if got := tunnelStatus(t, url, tokA, nil); got != http.StatusBadRequest {
		t.Fatalf("alpha: HTTP %d, want 400", got)
	}
	if got := tunnelStatus(t, url, tokB, nil); got != http.StatusUnauthorized {
		t.Fatalf("beta before it is in the file: HTTP %d, want 401", got)
	}
	writeAtomic(t, agentsFile, []byte("alpha sha256:"+sha256Hex(tokA)+"\nbeta sha256:"+sha256Hex(tokB)+"\n"))
	testwait.For(t, 15*time.Second, "beta admitted by the poll", func() bool { return tunnelStatus(t, url, tokB, nil) == http.StatusBadRequest })
	writeAtomic(t, agentsFile, []byte("beta sha256:"+sha256Hex(tokB)+"\n"))
	testwait.For(t, 15*time.Second, "alpha refused after its line went", func() bool { return tunnelStatus(t, url, tokA, nil) == http.StatusUnauthorized })
}

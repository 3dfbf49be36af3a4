package cli

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/testlog"
)

// TestVersionOutput checks `portway version` and `portway --version`: the
// version first, then commit, Go version and build tags.
func TestVersionOutput(t *testing.T) {
	b := Build{Version: "v1.2.3", Commit: "0123abc", GoVersion: "go1.99", Tags: []string{"nokubernetes"}}
	for _, args := range [][]string{{"version"}, {"--version"}} {
		var out, errOut bytes.Buffer
		if code := MainBuild(context.Background(), args, b, &out, &errOut); code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, errOut.String())
		}
		lines := strings.Split(strings.TrimSpace(out.String()), "\n")
		if len(lines) != 4 || lines[0] != "portway v1.2.3" ||
			!regexp.MustCompile(`^commit:\s+0123abc$`).MatchString(lines[1]) ||
			!regexp.MustCompile(`^go:\s+go1\.99 \w+/\w+$`).MatchString(lines[2]) ||
			!regexp.MustCompile(`^build tags:\s+nokubernetes$`).MatchString(lines[3]) {
			t.Errorf("%v printed:\n%s", args, out.String())
		}
	}
	// Nothing stamped: the toolchain's own version, and words for the rest.
	var out bytes.Buffer
	MainBuild(context.Background(), []string{"version"}, Build{Tags: []string{}}, &out, &out)
	if !strings.HasPrefix(out.String(), "portway dev\n") || !strings.Contains(out.String(), "build tags: none") {
		t.Errorf("unstamped version:\n%s", out.String())
	}
}

// TestTokenCommand checks that `portway token` prints a long random token
// and an agents: entry whose token_sha256 is that token's, which the gateway
// config accepts as pasted.
func TestTokenCommand(t *testing.T) {
	var out, errOut bytes.Buffer
	if code := Main(context.Background(), []string{"token", "--name", "prod-eu"}, "test", &out, &errOut); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	m := regexp.MustCompile(`^token: (\S+)\n(  - \{name: "prod-eu", token_sha256: "([0-9a-f]{64})"\})\n$`).FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("output:\n%s", out.String())
	}
	if len(m[1]) < 40 {
		t.Errorf("token %q is short", m[1])
	}
	if sum := sha256.Sum256([]byte(m[1])); hex.EncodeToString(sum[:]) != m[3] {
		t.Errorf("token_sha256 %s is not the token's", m[3])
	}
	// Pasted under agents:, it is a valid gateway config.
	dir := t.TempDir()
	cfg := filepath.Join(dir, "gateway.yaml")
	os.WriteFile(cfg, []byte("insecure: true\nstate_file: \"\"\nagents:\n"+m[2]+"\n"), 0o600)
	var v bytes.Buffer
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // only the config is of interest: stop at once
	if code := Main(ctx, []string{"gateway", "--config", cfg, "--listen", "127.0.0.1:0"}, "test", &v, &v); code != 0 {
		t.Errorf("pasted entry refused: exit %d: %s", code, v.String())
	}
	out.Reset()
	Main(context.Background(), []string{"token"}, "test", &out, &errOut)
	if strings.Contains(out.String(), m[1]) {
		t.Error("two runs printed the same token")
	}
}

// TestGatewayRefusesUnwritableStateDir checks that the gateway does not
// start when state_file cannot be written, naming the key and the path.
func TestGatewayRefusesUnwritableStateDir(t *testing.T) {
	dir := t.TempDir()
	// A regular file where the directory should be: unwritable even for root.
	blocker := filepath.Join(dir, "not-a-dir")
	os.WriteFile(blocker, nil, 0o600)
	state := filepath.Join(blocker, "gateway.db")
	var out, errOut testlog.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code := Main(ctx, []string{"gateway", "--insecure", "--listen", "127.0.0.1:0", "--state-file", state}, "test", &out, &errOut)
	if code == 0 || !strings.Contains(errOut.String(), "state_file: "+state) {
		t.Fatalf("exit %d, stderr %q", code, errOut.String())
	}
	if strings.Contains(errOut.String(), "gateway listening") {
		t.Errorf("the gateway started before refusing:\n%s", errOut.String())
	}
	// A writable directory, created on demand, is fine, and the check
	// leaves nothing behind in it.
	ok := filepath.Join(dir, "state", "gateway.db")
	ctx2, cancel2 := context.WithCancel(context.Background())
	done := make(chan int, 1)
	var out2, errOut2 testlog.Buffer
	go func() {
		done <- Main(ctx2, []string{"gateway", "--insecure", "--listen", "127.0.0.1:0", "--state-file", ok}, "test", &out2, &errOut2)
	}()
	waitFor(t, &errOut2, "gateway listening")
	cancel2()
	if code := <-done; code != 0 {
		t.Fatalf("writable state dir: exit %d: %s", code, errOut2.String())
	}
	ents, _ := os.ReadDir(filepath.Dir(ok))
	for _, e := range ents {
		if strings.Contains(e.Name(), ".check") {
			t.Errorf("the check left a file: %s", e.Name())
		}
	}
}

// selfSigned writes a self-signed certificate for 127.0.0.1 and its key
// into dir.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "portway test gateway"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	return certFile, keyFile
}

// TestAgentHintsAndAuthExit runs a real gateway with a self-signed
// certificate and agents from the command line: one without gateway.ca_file
// is told to set it, one with the CA but a wrong token and
// --exit-on-auth-failure exits with AuthExitCode instead of retrying, and one
// with both right comes up.
func TestAgentHintsAndAuthExit(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := selfSigned(t, dir)
	token := "0123456789abcdef0123456789abcdef"
	sum := sha256.Sum256([]byte(token))
	gwCfg := filepath.Join(dir, "gateway.yaml")
	os.WriteFile(gwCfg, []byte(fmt.Sprintf(`listen: "127.0.0.1:0"
port_range: "32000-32099"
bind_address: 127.0.0.1
state_file: ""
tls: {cert_file: %q, key_file: %q}
agents: [{name: a, token_sha256: %q}]
`, certFile, keyFile, hex.EncodeToString(sum[:]))), 0o600)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var gwOut, gwErr testlog.Buffer
	gwDone := make(chan int, 1)
	go func() { gwDone <- Main(ctx, []string{"gateway", "--config", gwCfg}, "test", &gwOut, &gwErr) }()
	defer func() {
		cancel()
		select {
		case <-gwDone:
		case <-time.After(15 * time.Second):
			t.Error("gateway did not stop")
		}
	}()
	waitFor(t, &gwErr, "gateway listening")
	m := regexp.MustCompile(`agents_url=(wss://\S+)`).FindStringSubmatch(gwErr.String())
	if m == nil {
		t.Fatalf("no agents_url in %s", gwErr.String())
	}
	url := m[1]

	agentCfg := func(withCA bool, token string) string {
		p := filepath.Join(dir, fmt.Sprintf("agent-%v-%s.yaml", withCA, token))
		ca := ""
		if withCA {
			ca = fmt.Sprintf(", ca_file: %q", certFile)
		}
		os.WriteFile(p, []byte(fmt.Sprintf("gateway: {url: %q, token: %q%s}\nmetrics: {listen: \"\"}\n", url, token, ca)), 0o600)
		return p
	}

	// No CA: the x509 error comes with the hint.
	actx, acancel := context.WithTimeout(ctx, 30*time.Second)
	var aOut, aErr testlog.Buffer
	aDone := make(chan int, 1)
	go func() {
		aDone <- Main(actx, []string{"agent", "--config", agentCfg(false, token)}, "test", &aOut, &aErr)
	}()
	waitFor(t, &aErr, "tunnel down")
	acancel()
	<-aDone
	if !strings.Contains(aErr.String(), "x509") || !strings.Contains(aErr.String(), "set gateway.ca_file to the gateway's CA") {
		t.Errorf("no ca_file hint in the agent's log:\n%s", aErr.String())
	}

	// The CA but a wrong token, with --exit-on-auth-failure: a prompt exit.
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	var wOut, wErr testlog.Buffer
	code := Main(wctx, []string{"agent", "--config", agentCfg(true, "wrong-token-0123456789"), "--exit-on-auth-failure"}, "test", &wOut, &wErr)
	if wctx.Err() != nil {
		t.Fatalf("agent with a wrong token kept retrying:\n%s", wErr.String())
	}
	if code != agent.AuthExitCode || !strings.Contains(wErr.String(), "portway: gateway rejected the token (HTTP 401)") {
		t.Errorf("wrong token: exit %d, stderr:\n%s", code, wErr.String())
	}

	// Both right: the tunnel comes up, and the flag changes nothing.
	rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
	var rOut, rErr testlog.Buffer
	rDone := make(chan int, 1)
	go func() {
		rDone <- Main(rctx, []string{"agent", "--config", agentCfg(true, token), "--exit-on-auth-failure"}, "test", &rOut, &rErr)
	}()
	waitFor(t, &rErr, "tunnel up")
	rcancel()
	if code := <-rDone; code != 0 {
		t.Errorf("agent exit %d:\n%s", code, rErr.String())
	}
}

// TestAgentLogsMetricsAddress checks that the metrics server's address is
// logged at start, loopback by default.
func TestAgentLogsMetricsAddress(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errOut testlog.Buffer
	done := make(chan int, 1)
	go func() {
		done <- Main(ctx, []string{"agent", "--gateway-url", "ws://127.0.0.1:1/v1/tunnel", "--token", "t", "--metrics-listen", "127.0.0.1:0"}, "test", &out, &errOut)
	}()
	waitFor(t, &errOut, "metrics listening")
	cancel()
	<-done
	if !regexp.MustCompile(`msg="metrics listening" addr=127\.0\.0\.1:\d+`).MatchString(errOut.String()) {
		t.Errorf("log:\n%s", errOut.String())
	}
}

// TestStatusColumns checks that the status table names the service's own
// port as such, beside the public endpoint, each under its heading.
func TestStatusColumns(t *testing.T) {
	var out bytes.Buffer
	writeStatus(&out, nil, []adminapi.ServiceInfo{{Agent: "prod-eu", ID: "postgres", Protocol: "tcp", Port: 5432, PublicPort: 15432, Endpoint: "gw.example.com:15432", Mode: "tunnel"}})
	lines := strings.Split(strings.TrimRight(out.String(), "\n"), "\n")
	head, row := lines[len(lines)-2], lines[len(lines)-1]
	for heading, value := range map[string]string{"SERVICE PORT": "5432", "PUBLIC ENDPOINT": "gw.example.com:15432"} {
		i := strings.Index(head, heading)
		if i < 0 || len(row) < i || !strings.HasPrefix(row[i:], value+" ") {
			t.Errorf("%q is not under %q:\n%s\n%s", value, heading, head, row)
		}
	}
}

// TestStatusListsInstances checks that an agent with several instances has
// each listed, with its id and remote address.
func TestStatusListsInstances(t *testing.T) {
	var out bytes.Buffer
	since := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	writeStatus(&out, []adminapi.AgentInfo{{Name: "prod-eu", Connected: true, Services: 1, Instances: []adminapi.InstanceInfo{
		{ID: "agent-7d9f-a", Protocol: "yamux", Remote: "10.0.0.1:4000", ConnectedSince: since, Services: 1, Active: 3},
		{ID: "agent-7d9f-b", Protocol: "yamux", Remote: "10.0.0.2:4000", ConnectedSince: since, Services: 1},
	}}}, nil)
	for _, want := range []string{"INSTANCE", "agent-7d9f-a", "10.0.0.1:4000", "agent-7d9f-b", "10.0.0.2:4000"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, out.String())
		}
	}
}

// TestFlagsSupplyWhatTheFileLacks checks that flags are applied before the
// file is validated: --token for an agent.yaml without one, --port-range
// for a gateway.yaml whose range is wrong.
func TestFlagsSupplyWhatTheFileLacks(t *testing.T) {
	dir := t.TempDir()
	gw := filepath.Join(dir, "gateway.yaml")
	os.WriteFile(gw, []byte("listen: \"127.0.0.1:0\"\nstate_file: \"\"\ninsecure: true\nport_range: \"20000-10000\"\n"), 0o600)
	ag := filepath.Join(dir, "agent.yaml")
	os.WriteFile(ag, []byte("gateway: {url: \"ws://127.0.0.1:1/v1/tunnel\"}\nmetrics: {listen: \"\"}\n"), 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // only the config is of interest: stop at once
	for _, args := range [][]string{
		{"gateway", "--config", gw, "--port-range", "31000-31010"},
		{"agent", "--config", ag, "--token", "from-the-flag"},
	} {
		var out bytes.Buffer
		if code := Main(ctx, args, "test", &out, &out); code != 0 {
			t.Errorf("%v: exit %d: %s", args, code, out.String())
		}
	}
	// Without the flag, the file's gap is reported with the file's name.
	var out bytes.Buffer
	if code := Main(ctx, []string{"agent", "--config", ag}, "test", &out, &out); code == 0 || !strings.Contains(out.String(), ag+":1: gateway.token: is required") {
		t.Errorf("agent without a token: exit %d: %s", code, out.String())
	}
}

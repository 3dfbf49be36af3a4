package e2e

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/portway/portway/internal/agent"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/testnet"
	"github.com/portway/portway/internal/testwait"
)

// writeTestCert writes a self-signed ECDSA certificate for 127.0.0.1 and
// its key, and returns their paths.
func writeTestCert(t *testing.T) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return writeCertWithKey(t, key)
}

// writeCertWithKey writes a self-signed certificate for 127.0.0.1 signed by
// key, and the key, and returns their paths.
func writeCertWithKey(t *testing.T, key crypto.Signer) (certFile, keyFile string) {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "portway test gateway"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kb}), 0o600)
	return certFile, keyFile
}

// The agent endpoint over TLS, with the agent trusting the gateway's
// certificate through gateway.ca_file, and a token configured only by its
// SHA-256. An agent that does not trust the certificate is refused by its
// own TLS check, and says so.
func TestTLSAndHashedToken(t *testing.T) {
	certFile, keyFile := writeTestCert(t)
	const token = "hashed-token-0123456789abcdef"
	sum := sha256.Sum256([]byte(token))
	g := startGateway(t, func(c *config.GatewayFile) {
		c.Insecure = false
		c.TLS = &config.TLS{CertFile: certFile, KeyFile: keyFile}
		c.Agents = []config.AgentIdentity{{Name: "hashed", TokenSHA256: hex.EncodeToString(sum[:])}}
	})
	url := "wss://" + g.TunnelAddr().String() + "/v1/tunnel"
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			a := startAgent(t, url, token, mode, []config.StaticService{{Name: "echo", Protocol: "tcp", Port: 7, Backend: echoBackend(t)}},
				func(c *config.AgentFile) { c.Gateway.CAFile = certFile })
			if err := testnet.EchoRoundTrip(a.waitReady(t)["echo"], []byte("over tls")); err != nil {
				t.Fatal(err)
			}
		})
	}

	untrusting := startAgent(t, url, token, "auto", nil)
	testwait.For(t, 10*time.Second, "the untrusting agent to report the certificate", func() bool {
		return strings.Contains(untrusting.log.String(), "certificate")
	})
	if untrusting.Ready() {
		t.Fatal("an agent that does not trust the certificate connected")
	}
	// Plain ws:// to a TLS endpoint does not get through either.
	plain := startAgent(t, "ws://"+g.TunnelAddr().String()+"/v1/tunnel", token, "auto", nil)
	time.Sleep(time.Second)
	if plain.Ready() {
		t.Fatal("plain ws:// connected to a TLS endpoint")
	}
}

// The gateway's TLS floor is 1.2 with forward-secret AEAD suites. Each probe
// is a real ClientHello offering only what must be refused, and each must
// be refused by the gateway's alert, not by the client's own policy: a Go
// client accepts TLS 1.0/1.1 and any suite when told so explicitly. The
// certificate is RSA so that RSA key exchange would be possible if the
// gateway allowed it.
func TestTLSRefusesOldVersionsAndWeakSuites(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := writeCertWithKey(t, key)
	g := startGateway(t, func(c *config.GatewayFile) {
		c.Insecure = false
		c.TLS = &config.TLS{CertFile: certFile, KeyFile: keyFile}
	})
	probe := func(cfg *tls.Config) error {
		cfg.InsecureSkipVerify = true
		d := tls.Dialer{Config: cfg, NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := d.DialContext(ctx, "tcp", g.TunnelAddr().String())
		if err == nil {
			c.Close()
		}
		return err
	}
	// The control: this client setup reaches the gateway when it offers
	// what the gateway allows.
	if err := probe(&tls.Config{MinVersion: tls.VersionTLS12, MaxVersion: tls.VersionTLS12,
		CipherSuites: []uint16{tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256}}); err != nil {
		t.Fatalf("TLS 1.2 with an ECDHE AEAD suite: %v", err)
	}
	cases := []struct {
		name  string
		cfg   *tls.Config
		alert string // the gateway's alert, as the client reports it: "remote error"
	}{
		{"TLS 1.0", &tls.Config{MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS10}, "protocol version not supported"},
		{"TLS 1.1", &tls.Config{MinVersion: tls.VersionTLS11, MaxVersion: tls.VersionTLS11}, "protocol version not supported"},
		{"TLS 1.2 CBC only", &tls.Config{MinVersion: tls.VersionTLS12, MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{
			tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA, tls.TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA, tls.TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256,
		}}, "handshake failure"},
		{"TLS 1.2 without ECDHE", &tls.Config{MinVersion: tls.VersionTLS12, MaxVersion: tls.VersionTLS12, CipherSuites: []uint16{
			tls.TLS_RSA_WITH_AES_128_GCM_SHA256, tls.TLS_RSA_WITH_AES_256_GCM_SHA384, tls.TLS_RSA_WITH_AES_128_CBC_SHA,
		}}, "handshake failure"},
	}
	for _, c := range cases {
		err := probe(c.cfg)
		switch {
		case err == nil:
			t.Errorf("%s: the gateway completed the handshake", c.name)
		case !strings.Contains(err.Error(), "remote error: tls: "+c.alert):
			t.Errorf("%s: %v; want the gateway's %q alert", c.name, err, c.alert)
		default:
			t.Logf("%s: %v", c.name, err)
		}
	}
}

// Services withdrawn from the agent's set close their public port at once,
// and come back on the same port.
func TestWithdrawnServiceClosesAndComesBack(t *testing.T) {
	g := startGateway(t)
	echo := echoBackend(t)
	a := startAgent(t, g.url(), tokenA, "yamux", []config.StaticService{{Name: "static", Protocol: "tcp", Port: 7, Backend: echo}})
	a.waitReady(t)
	dyn := agent.Service{ID: "dynamic", Protocol: protocol.KindTCP, Port: 4242, Backend: echo, Mode: "tunnel"}
	endpoint := func() string {
		for _, e := range a.Endpoints() {
			if e.Service.ID == "dynamic" {
				return e.Address
			}
		}
		return ""
	}
	a.SetDiscovered([]agent.Service{dyn})
	testwait.For(t, 5*time.Second, "the service to be exposed", func() bool { return endpoint() != "" })
	ep := endpoint()
	if err := testnet.EchoRoundTrip(ep, []byte("up")); err != nil {
		t.Fatal(err)
	}
	a.SetDiscovered(nil)
	testwait.For(t, 5*time.Second, "the withdrawn service's port to close", func() bool {
		c, err := net.DialTimeout("tcp", ep, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil && endpoint() == ""
	})
	a.SetDiscovered([]agent.Service{dyn})
	testwait.For(t, 5*time.Second, "the service to return", func() bool { return endpoint() != "" })
	if got := endpoint(); got != ep {
		t.Fatalf("service came back on %s, was %s", got, ep)
	}
	if err := testnet.EchoRoundTrip(ep, []byte("back")); err != nil {
		t.Fatal(err)
	}
}

package gateway

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/testlog"
)

// writeSelfSigned writes a self-signed certificate for 127.0.0.1 valid
// until notAfter into dir, returning the config block naming it.
func writeSelfSigned(t *testing.T, dir string, serial int64, notAfter time.Time) *config.TLS {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: notAfter.Add(-30 * 24 * time.Hour), NotAfter: notAfter,
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	c := &config.TLS{CertFile: filepath.Join(dir, "tls.crt"), KeyFile: filepath.Join(dir, "tls.key")}
	if err := os.WriteFile(c.CertFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.KeyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return c
}

func reloadTestConfig(tc *config.TLS) *config.GatewayFile {
	cfg := config.DefaultGateway()
	cfg.Listen = "127.0.0.1:0"
	cfg.PublicHost = "127.0.0.1"
	cfg.BindAddress = "127.0.0.1"
	cfg.StateFile = ""
	cfg.TLS = tc
	cfg.Agents = []config.AgentIdentity{{Name: "agent-a", Token: "agent-a-token-0123456789"}}
	return cfg
}

// TestCertificateExpiryAtStart: the certificate's expiry is exported; one
// expiring within 14 days is warned about and an expired one is an error,
// but the gateway starts (so that the renewal is picked up by a reload).
func TestCertificateExpiryAtStart(t *testing.T) {
	for _, tc := range []struct {
		name     string
		left     time.Duration
		want     string
		wantNone []string
	}{
		{"valid", 60 * 24 * time.Hour, "", []string{"expires soon", "has expired"}},
		{"expires soon", 3 * 24 * time.Hour, `level=WARN msg="TLS certificate expires soon"`, []string{"has expired"}},
		{"expired", -time.Hour, `level=ERROR msg="TLS certificate has expired`, []string{"expires soon"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			notAfter := time.Now().Add(tc.left).Truncate(time.Second)
			cfg := reloadTestConfig(writeSelfSigned(t, t.TempDir(), 1, notAfter))
			log, buf := testlog.New(t, "gateway")
			g, err := New(Options{Config: cfg, Logger: log})
			if err != nil {
				t.Fatal(err)
			}
			if err := g.Start(context.Background()); err != nil {
				t.Fatalf("start with a certificate that %s: %v", tc.name, err)
			}
			defer g.Close()
			if got := gaugeValue(t, g.certNotAfter); got != notAfter.Unix() {
				t.Fatalf("not-after metric %d, want %d", got, notAfter.Unix())
			}
			if tc.want != "" && !strings.Contains(buf.String(), tc.want) {
				t.Fatalf("log lacks %q:\n%s", tc.want, buf.String())
			}
			for _, s := range tc.wantNone {
				if strings.Contains(buf.String(), s) {
					t.Fatalf("log has %q:\n%s", s, buf.String())
				}
			}
		})
	}
}

// TestReloadAllOrNothing: a reload whose certificate does not load changes
// nothing (tokens, certificate, metric); a good one swaps them and lists
// the keys that need a restart.
func TestReloadAllOrNothing(t *testing.T) {
	dir := t.TempDir()
	first := time.Now().Add(60 * 24 * time.Hour).Truncate(time.Second)
	cfg := reloadTestConfig(writeSelfSigned(t, dir, 1, first))
	log, _ := testlog.New(t, "gateway")
	g, err := New(Options{Config: cfg, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	const newToken = "agent-b-token-0123456789"

	// A key that does not match its certificate: refused as a whole.
	other := writeSelfSigned(t, t.TempDir(), 2, first.Add(24*time.Hour))
	bad := reloadTestConfig(&config.TLS{CertFile: other.CertFile, KeyFile: cfg.TLS.KeyFile})
	bad.Agents = append(bad.Agents, config.AgentIdentity{Name: "agent-b", Token: newToken})
	if _, err := g.Reload(bad); err == nil {
		t.Fatal("reload with a mismatched key pair succeeded")
	}
	if _, ok := g.authenticate("Bearer " + newToken); ok {
		t.Fatal("a failed reload added a token")
	}
	if got := g.cert.Load().cert.Leaf.SerialNumber.Int64(); got != 1 {
		t.Fatalf("a failed reload changed the certificate to serial %d", got)
	}
	if got := gaugeValue(t, g.certNotAfter); got != first.Unix() {
		t.Fatalf("a failed reload changed the not-after metric to %d", got)
	}

	good := reloadTestConfig(other)
	good.Agents = append(good.Agents, config.AgentIdentity{Name: "agent-b", Token: newToken})
	good.Listen = "127.0.0.1:1"
	good.MaxServices = 7
	restart, err := g.Reload(good)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(restart, []string{"listen"}) {
		t.Fatalf("needs a restart: %v, want [listen]", restart)
	}
	if tok, ok := g.authenticate("Bearer " + newToken); !ok || tok.name != "agent-b" || tok.maxServices != 7 {
		t.Fatalf("reloaded token: %+v %v", tok, ok)
	}
	if got := g.cert.Load().cert.Leaf.SerialNumber.Int64(); got != 2 {
		t.Fatalf("reloaded certificate has serial %d, want 2", got)
	}
	if got := gaugeValue(t, g.certNotAfter); got != first.Add(24*time.Hour).Unix() {
		t.Fatalf("not-after metric %d after reload", got)
	}
	if g.TunnelAddr().String() == "127.0.0.1:1" {
		t.Fatal("listen changed without a restart")
	}
}

func gaugeValue(t *testing.T, m prometheus.Gauge) int64 {
	t.Helper()
	var out dto.Metric
	if err := m.Write(&out); err != nil {
		t.Fatal(err)
	}
	return int64(out.GetGauge().GetValue())
}

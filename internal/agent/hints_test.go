package agent

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"testing"
)

// TestTLSHint checks that each certificate failure an operator fixes in
// the config says what to change, and that other errors pass unchanged.
func TestTLSHint(t *testing.T) {
	cert := &x509.Certificate{DNSNames: []string{"gw.internal"}}
	wrap := func(e error) error {
		return fmt.Errorf("dial wss://gw:8443/v1/tunnel: %w", &tls.CertificateVerificationError{Err: e})
	}
	cases := map[string]struct {
		err  error
		want string
	}{
		"unknown CA": {wrap(x509.UnknownAuthorityError{Cert: cert}), "set gateway.ca_file to the gateway's CA"},
		"hostname":   {wrap(x509.HostnameError{Certificate: cert, Host: "gw.example.com"}), "does not name the host in gateway.url"},
		"expired":    {wrap(x509.CertificateInvalidError{Cert: cert, Reason: x509.Expired}), "has expired"},
		"other":      {wrap(x509.CertificateInvalidError{Cert: cert, Reason: x509.NotAuthorizedToSign}), "check gateway.ca_file and gateway.server_name"},
	}
	for name, c := range cases {
		got := tlsHint(c.err)
		if !strings.Contains(got.Error(), c.want) || !errors.Is(got, c.err) {
			t.Errorf("%s: %v, want it to contain %q and wrap the cause", name, got, c.want)
		}
	}
	plain := errors.New("dial tcp 127.0.0.1:1: connection refused")
	if got := tlsHint(plain); got != plain {
		t.Errorf("a non-TLS error was changed: %v", got)
	}
}

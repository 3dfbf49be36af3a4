package agent

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
)

// ErrAuthRejected is returned by Run, when Options.ExitOnAuthFailure is set,
// once the gateway refuses the agent's token: retrying a wrong token never
// succeeds, and a supervisor should hear about it instead.
var ErrAuthRejected = errors.New("gateway rejected the token (HTTP 401): check gateway.token or PORTWAY_GATEWAY_TOKEN, and the agent's token_sha256 in the gateway's config")

// AuthExitCode is the process exit status for ErrAuthRejected (EX_CONFIG of
// sysexits.h), distinct so that a supervisor can be told not to restart on
// it (systemd: RestartPreventExitStatus=78).
const AuthExitCode = 78

// tlsHint adds to a failed TLS handshake with the gateway what to change,
// when the cause is one an operator fixes in the config. Other errors are
// returned as they are.
func tlsHint(err error) error {
	var (
		unknownCA x509.UnknownAuthorityError
		hostname  x509.HostnameError
		invalid   x509.CertificateInvalidError
		verify    *tls.CertificateVerificationError
	)
	switch {
	case errors.As(err, &unknownCA):
		return fmt.Errorf("%w (the gateway's certificate is not signed by a CA this agent trusts: set gateway.ca_file to the gateway's CA certificate (PEM), or give the gateway a certificate from a public CA)", err)
	case errors.As(err, &hostname):
		return fmt.Errorf("%w (the gateway's certificate does not name the host in gateway.url: connect by a name the certificate holds, or set gateway.server_name to one of them)", err)
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		return fmt.Errorf("%w (the gateway's certificate has expired or is not valid yet: renew it on the gateway, or check this host's clock)", err)
	case errors.As(err, &verify):
		return fmt.Errorf("%w (the gateway's certificate could not be verified: check gateway.ca_file and gateway.server_name)", err)
	}
	return err
}

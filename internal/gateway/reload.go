package gateway

import (
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/portway/portway/internal/config"
)

// live is the part of the configuration a reload replaces. It is swapped
// whole and read without a lock, on every handshake and registration.
type live struct {
	cfg *config.GatewayFile
	// bySum maps each accepted token's SHA-256 to the agent it belongs
	// to; byName maps each agent to its accepted tokens. Both are maps so
	// that a handshake, and every session's check after a reload, costs
	// the same with ten thousand agents as with one.
	bySum  map[[sha256.Size]byte]agentToken
	byName map[string][]agentToken
	// admin is the SHA-256 of admin.token.
	admin [sha256.Size]byte
	// retained is each configured agent's cap on retained ports;
	// retainedDefault applies to agents no longer configured.
	retained        map[string]int
	retainedDefault int
}

// newLive derives the reloadable state from a validated config: the
// agents of gateway.yaml and of its agents file alike.
func newLive(cfg *config.GatewayFile) *live {
	agents := cfg.AllAgents()
	l := &live{
		cfg:             cfg,
		bySum:           make(map[[sha256.Size]byte]agentToken, len(agents)),
		byName:          make(map[string][]agentToken, len(agents)),
		admin:           sha256.Sum256([]byte(cfg.Admin.Token)),
		retained:        make(map[string]int, len(agents)),
		retainedDefault: cfg.RetainedPortsCap(nil),
	}
	for i := range agents {
		a := &agents[i]
		l.retained[a.Name] = cfg.RetainedPortsCap(a)
		t := agentToken{name: a.Name, maxServices: a.MaxServices}
		if t.maxServices == 0 {
			t.maxServices = cfg.MaxServices
		}
		if a.Token != "" {
			t.sum = sha256.Sum256([]byte(a.Token))
		} else {
			b, _ := hex.DecodeString(a.TokenSHA256) // validated
			copy(t.sum[:], b)
		}
		l.add(t)
		if a.TokenSHA256Next != "" {
			b, _ := hex.DecodeString(a.TokenSHA256Next) // validated
			copy(t.sum[:], b)
			l.add(t)
		}
	}
	return l
}

// add accepts token t. Two agents with the same token hash cannot both be
// told apart by it: the later one wins, as the linear scan it replaces did.
func (l *live) add(t agentToken) {
	l.bySum[t.sum] = t
	l.byName[t.name] = append(l.byName[t.name], t)
}

// lookup returns the agent whose token has the SHA-256 sum. The map is
// keyed by the token's hash, never by the token: how long the lookup takes
// can only tell an attacker about hashes, which do not lead back to a token.
func (l *live) lookup(sum [sha256.Size]byte) (agentToken, bool) {
	t, ok := l.bySum[sum]
	return t, ok
}

// conf returns the current configuration: the one of the last successful
// reload, or the start one (also for a Gateway not built by New).
func (g *Gateway) conf() *config.GatewayFile {
	if l := g.live.Load(); l != nil {
		return l.cfg
	}
	return g.cfg
}

// maxServices returns the current service quota of the agent name.
func (l *live) maxServices(name string) int {
	if ts := l.byName[name]; len(ts) > 0 {
		return ts[0].maxServices
	}
	return l.cfg.MaxServices
}

// accepts reports whether tok (an agent name and the token sum it
// authenticated with) is still configured.
func (l *live) accepts(tok agentToken) bool {
	ok := 0
	for _, t := range l.byName[tok.name] {
		if subtle.ConstantTimeCompare(t.sum[:], tok.sum[:]) == 1 {
			ok = 1
		}
	}
	return ok == 1
}

// tokenWatch returns a channel closed by the next reload. Sessions wait on
// it to check that their token is still accepted.
func (g *Gateway) tokenWatch() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.reloaded
}

// Reload applies cfg, already validated, to the running gateway: agents
// and their tokens, the TLS certificate (read again from its files, so a
// renewal under the same names is picked up), limits and the admin token.
// Sessions whose agent or token is gone are closed; the others, and every
// public listener, are untouched. Settings that cannot change on a running
// gateway are returned by their keys and otherwise ignored. On error
// nothing changed.
func (g *Gateway) Reload(cfg *config.GatewayFile) (needRestart []string, err error) {
	if cfg == nil {
		return nil, errors.New("gateway: reload: no config")
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("gateway: reload: %w", err)
	}
	// File I/O before the lock: under it only this package's state and
	// the certificate gauge are touched, and logging waits until after.
	var cert *tls.Certificate
	if cfg.TLS != nil && g.cfg.TLS != nil {
		if cert, err = loadCertificate(cfg.TLS); err != nil {
			return nil, fmt.Errorf("gateway: reload: %w", err)
		}
	}
	needRestart = restartKeys(g.cfg, cfg)
	next := newLive(cfg)

	g.reloadMu.Lock()
	prev := g.live.Swap(next)
	if cert != nil {
		g.setCertificate(cert, cfg.TLS.CertFile)
	}
	g.limiter.setLimit(cfg.AuthFailuresPerMinute)
	for _, a := range g.agentList() {
		a.setMaxServices(next.maxServices(a.name))
	}
	// Wake every session to check its token against the new set.
	g.mu.Lock()
	close(g.reloaded)
	g.reloaded = make(chan struct{})
	g.mu.Unlock()
	g.reloadMu.Unlock()

	added, removed := agentDiff(prev.byName, next.byName)
	g.log.Info("configuration reloaded", "agents", len(next.byName), "agents_added", logNames(added),
		"agents_removed", logNames(removed), "tokens", len(next.bySum))
	if len(needRestart) > 0 {
		g.log.Warn("configuration changes that need a restart were ignored", "keys", needRestart)
	}
	if cert != nil {
		g.checkCertificate()
	}
	return needRestart, nil
}

// agentDiff names the agents added to and removed from the config.
func agentDiff(before, after map[string][]agentToken) (added, removed []string) {
	for n := range after {
		if _, ok := before[n]; !ok {
			added = append(added, n)
		}
	}
	for n := range before {
		if _, ok := after[n]; !ok {
			removed = append(removed, n)
		}
	}
	slices.Sort(added)
	slices.Sort(removed)
	return added, removed
}

// maxLoggedNames bounds the agent names one reload log line lists: a
// generated agents file may change thousands at once.
const maxLoggedNames = 20

// logNames is names for a log line: all of them, or the first
// maxLoggedNames and how many more.
func logNames(names []string) any {
	if len(names) <= maxLoggedNames {
		return names
	}
	return fmt.Sprintf("%s and %d more", strings.Join(names[:maxLoggedNames], ", "), len(names)-maxLoggedNames)
}

// restartKeys lists the keys whose change a running gateway cannot apply:
// bound listeners, the port allocator and the state file.
func restartKeys(old, cur *config.GatewayFile) []string {
	var keys []string
	add := func(key string, changed bool) {
		if changed {
			keys = append(keys, key)
		}
	}
	add("listen", old.Listen != cur.Listen)
	add("public_host", old.PublicHost != cur.PublicHost)
	add("port_range", old.PortRange != cur.PortRange)
	add("bind_address", old.BindAddress != cur.BindAddress)
	add("state_file", old.StateFile != cur.StateFile)
	add("insecure", old.Insecure != cur.Insecure)
	add("tls", (old.TLS == nil) != (cur.TLS == nil))
	add("admin.listen", old.Admin.Listen != cur.Admin.Listen)
	add("handshake_timeout", old.HandshakeTimeout.Duration != cur.HandshakeTimeout.Duration)
	add("port_retention", old.PortRetention.Duration != cur.PortRetention.Duration)
	add("cluster", !reflect.DeepEqual(old.Cluster, cur.Cluster))
	return keys
}

// setMaxServices sets the agent's quota, applied from its next
// registration.
func (a *agentState) setMaxServices(n int) {
	a.mu.Lock()
	a.maxServices = n
	a.mu.Unlock()
}

// setLimit changes the failed attempts allowed per window.
func (l *authLimiter) setLimit(n int) {
	l.mu.Lock()
	l.limit = n
	l.mu.Unlock()
}

// CertExpiryWarning is how long before its expiry a certificate is
// warned about, at start and on every reload.
const CertExpiryWarning = 14 * 24 * time.Hour

// loadCertificate reads the key pair c names.
func loadCertificate(c *config.TLS) (*tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("tls: load %s and %s: %w", c.CertFile, c.KeyFile, err)
	}
	if cert.Leaf == nil {
		return nil, fmt.Errorf("tls: %s: no parsed certificate", c.CertFile)
	}
	return &cert, nil
}

// setCertificate makes cert the one new handshakes present and publishes
// its expiry. The caller then checks it (checkCertificate, which logs): an
// expired certificate is still served, since refusing to start would keep
// the gateway down after the renewal lands, and a reload picks it up.
func (g *Gateway) setCertificate(cert *tls.Certificate, file string) {
	g.cert.Store(&servedCert{cert: cert, file: file})
	g.certNotAfter.Set(float64(cert.Leaf.NotAfter.Unix()))
}

// servedCert is the certificate new handshakes get, and its file.
type servedCert struct {
	cert *tls.Certificate
	file string
}

// checkCertificate logs an error for an expired certificate and a warning
// for one expiring within CertExpiryWarning.
func (g *Gateway) checkCertificate() {
	sc := g.cert.Load()
	if sc == nil {
		return
	}
	notAfter, file := sc.cert.Leaf.NotAfter, sc.file
	switch left := time.Until(notAfter); {
	case left <= 0:
		g.log.Error("TLS certificate has expired: agents refuse the handshake until it is renewed (the new files are picked up without a restart)",
			"cert_file", file, "not_after", notAfter.UTC())
	case left <= CertExpiryWarning:
		g.log.Warn("TLS certificate expires soon", "cert_file", file, "not_after", notAfter.UTC(),
			"days_left", int(left.Hours()/24))
	}
}

// getCertificate serves the current certificate to each new handshake.
func (g *Gateway) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return g.cert.Load().cert, nil
}

// Package cluster is what gateway replicas share besides port allocations
// (internal/store): the etcd client built from gateway.yaml's cluster:
// block, and presence: each replica's lease-bound record of itself and of
// every agent session it holds, so that the others know who is alive and
// where each agent can be reached.
//
// Presence records live under PREFIX/replicas/<replica> and
// PREFIX/sessions/<replica>/<agent>/<instance>, all attached to the
// replica's lease. A replica cut off from etcd cannot renew the lease: its
// Lost channel closes, and when the lease expires in etcd its records
// vanish from everyone's view.
//
// # Locks
//
// Etcd.mu guards the set of published sessions; it is a leaf, and no etcd
// call is made while it is held.
package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/portway/portway/internal/config"
)

// NewEtcdClient returns a client for the cluster's etcd, with its TLS
// client certificate and credentials. It does not wait for a connection:
// the first call does.
func NewEtcdClient(c *config.Cluster) (*clientv3.Client, error) {
	cfg := clientv3.Config{
		Endpoints:   c.Etcd.Endpoints,
		DialTimeout: c.Etcd.RequestTimeout.Duration,
		Username:    c.Etcd.Username,
		Password:    c.Etcd.Password,
		// Keepalives find a dead member quickly, so the client moves on
		// to another endpoint.
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		// etcd's client logs every retry; the gateway reports what
		// matters (a failed operation, a lost lease) itself.
		Logger: zap.NewNop(),
	}
	tlsCfg, err := clientTLS(c)
	if err != nil {
		return nil, err
	}
	cfg.TLS = tlsCfg
	cl, err := clientv3.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("cluster: etcd client: %w", err)
	}
	return cl, nil
}

// clientTLS is the TLS configuration for etcd: from cluster.etcd.tls, or
// the system's roots when an endpoint is https:// without it.
func clientTLS(c *config.Cluster) (*tls.Config, error) {
	t := c.Etcd.TLS
	if t == nil {
		for _, e := range c.Etcd.Endpoints {
			if strings.HasPrefix(e, "https://") {
				return &tls.Config{MinVersion: tls.VersionTLS12}, nil
			}
		}
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("cluster.etcd.tls.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("cluster.etcd.tls.ca_file: %s holds no PEM certificate", t.CAFile)
		}
		cfg.RootCAs = pool
	}
	if t.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("cluster.etcd.tls.cert_file/key_file: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// Replica is a replica's presence record.
type Replica struct {
	ID string `json:"id"`
	// Advertise is the host:port other replicas reach it on.
	Advertise string `json:"advertise"`
	// Since is when it joined.
	Since time.Time `json:"since"`
}

// Session is an agent session a replica holds.
type Session struct {
	Replica string `json:"replica"`
	Agent   string `json:"agent"`
	// Instance is the agent process's instance id; empty for an agent
	// that does not send one.
	Instance string `json:"instance,omitempty"`
	// Protocol is the session's multiplexing: yamux or json.
	Protocol string    `json:"protocol"`
	Since    time.Time `json:"since"`
}

// Presence publishes a replica's agent sessions for the others.
type Presence interface {
	// AddSession publishes s (its Replica is filled in).
	AddSession(ctx context.Context, s Session) error
	// RemoveSession withdraws the session of s.Agent and s.Instance.
	RemoveSession(ctx context.Context, s Session) error
	// Lost is closed when the replica's lease is gone: its records are
	// no longer (or soon no longer) visible to the others. Never closed
	// for a single gateway.
	Lost() <-chan struct{}
	// Close withdraws every record of the replica.
	Close() error
}

// Noop is the Presence of a single gateway (no cluster: block): there is
// nobody to tell.
type Noop struct{}

// AddSession implements Presence.
func (Noop) AddSession(context.Context, Session) error { return nil }

// RemoveSession implements Presence.
func (Noop) RemoveSession(context.Context, Session) error { return nil }

// Lost implements Presence: never.
func (Noop) Lost() <-chan struct{} { return nil }

// Close implements Presence.
func (Noop) Close() error { return nil }

// Key layout under the prefix.
const (
	replicasDir = "replicas/"
	sessionsDir = "sessions/"
)

// noInstance stands for an empty instance id in a key.
const noInstance = "-"

func replicaKey(prefix, id string) string { return prefix + replicasDir + id }

func sessionKey(prefix string, s Session) string {
	inst := noInstance
	if s.Instance != "" {
		inst = url.PathEscape(s.Instance)
	}
	return prefix + sessionsDir + s.Replica + "/" + s.Agent + "/" + inst
}

// DecodeReplica parses a replica record stored at key under prefix.
func DecodeReplica(prefix string, key, value []byte) (Replica, error) {
	id, ok := strings.CutPrefix(string(key), prefix+replicasDir)
	if !ok || id == "" || strings.Contains(id, "/") {
		return Replica{}, fmt.Errorf("key %q is not a replica record", key)
	}
	var r Replica
	if err := json.Unmarshal(value, &r); err != nil {
		return Replica{}, fmt.Errorf("replica %q: %w", id, err)
	}
	if r.ID != id {
		return Replica{}, fmt.Errorf("key %q holds replica %q", key, r.ID)
	}
	return r, nil
}

// DecodeSession parses a session record stored at key under prefix.
func DecodeSession(prefix string, key, value []byte) (Session, error) {
	rest, ok := strings.CutPrefix(string(key), prefix+sessionsDir)
	parts := strings.Split(rest, "/")
	if !ok || len(parts) != 3 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
		return Session{}, fmt.Errorf("key %q is not a session record", key)
	}
	var s Session
	if err := json.Unmarshal(value, &s); err != nil {
		return Session{}, fmt.Errorf("session %q: %w", rest, err)
	}
	if s.Replica != parts[0] || s.Agent != parts[1] || sessionKey(prefix, s) != string(key) {
		return Session{}, fmt.Errorf("key %q holds a session of %q on %q", key, s.Agent, s.Replica)
	}
	return s, nil
}

// errLost is returned by a Presence whose lease is gone.
var errLost = errors.New("cluster: this replica's lease is lost")

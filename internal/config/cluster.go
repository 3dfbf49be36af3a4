package config

import (
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"
)

// Cluster is gateway.yaml's cluster: block. With it, the gateway keeps
// its port allocations in etcd, shared with the other replicas, and
// publishes its presence there; without it, one gateway keeps them in
// state_file.
type Cluster struct {
	Etcd ClusterEtcd `json:"etcd"`
	// ReplicaID names this replica in etcd; default: the host name.
	ReplicaID string `json:"replica_id"`
	// Advertise is the host:port other replicas reach this one on
	// (PORTWAY_CLUSTER_ADVERTISE overrides it).
	Advertise string `json:"advertise"`
	// Token is the replica-to-replica secret (PORTWAY_CLUSTER_TOKEN
	// overrides it).
	Token string `json:"token,omitempty"`
}

// ClusterEtcd is how the gateway reaches etcd.
type ClusterEtcd struct {
	// Endpoints are etcd's client URLs (http://host:port, https://…, or
	// host:port).
	Endpoints []string `json:"endpoints"`
	// Prefix is the key prefix of everything portway stores.
	Prefix string   `json:"prefix"`
	TLS    *EtcdTLS `json:"tls,omitempty"`
	// Username and Password authenticate to etcd (PORTWAY_ETCD_PASSWORD
	// overrides the password).
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"`
	// RequestTimeout bounds the etcd calls of one registration: a
	// registration that cannot reach etcd fails its new services with an
	// error after it, instead of hanging.
	RequestTimeout Duration `json:"request_timeout"`
	// LeaseTTL is the lifetime of the presence records without renewal:
	// a replica cut off from etcd loses them after it.
	LeaseTTL Duration `json:"lease_ttl"`
}

// EtcdTLS is etcd's client TLS: a CA to verify etcd, a client
// certificate to present.
type EtcdTLS struct {
	CAFile   string `json:"ca_file"`
	CertFile string `json:"cert_file"`
	KeyFile  string `json:"key_file"`
}

// Cluster defaults.
const (
	DefaultEtcdPrefix         = "/portway/"
	DefaultEtcdRequestTimeout = 5 * time.Second
	DefaultLeaseTTL           = 10 * time.Second
)

// applyClusterEnv takes the cluster secrets and the advertised address
// from the environment, when a cluster: block exists.
func (g *GatewayFile) applyClusterEnv(getenv func(string) string) {
	c := g.Cluster
	if c == nil || getenv == nil {
		return
	}
	if v := getenv("PORTWAY_ETCD_PASSWORD"); v != "" {
		c.Etcd.Password = v
	}
	if v := getenv("PORTWAY_CLUSTER_TOKEN"); v != "" {
		c.Token = v
	}
	if v := getenv("PORTWAY_CLUSTER_ADVERTISE"); v != "" {
		c.Advertise = v
	}
}

// validateCluster fills the cluster defaults and checks the block.
func (g *GatewayFile) validateCluster(p *problems) {
	c := g.Cluster
	if c == nil {
		return
	}
	if len(c.Etcd.Endpoints) == 0 {
		p.add("cluster.etcd.endpoints", "is required: list etcd's client URLs")
	}
	for i, e := range c.Etcd.Endpoints {
		if err := checkEndpoint(e); err != nil {
			p.add(fmt.Sprintf("cluster.etcd.endpoints[%d]", i), "%q %v", e, err)
		}
	}
	if c.Etcd.Prefix == "" {
		c.Etcd.Prefix = DefaultEtcdPrefix
	}
	if !strings.HasPrefix(c.Etcd.Prefix, "/") || !strings.HasSuffix(c.Etcd.Prefix, "/") || strings.ContainsAny(c.Etcd.Prefix, " \t\n") {
		p.add("cluster.etcd.prefix", "%q must begin and end with / and hold no spaces", c.Etcd.Prefix)
	}
	if t := c.Etcd.TLS; t != nil {
		if (t.CertFile == "") != (t.KeyFile == "") {
			p.add("cluster.etcd.tls", "cert_file and key_file go together")
		}
		for key, f := range map[string]string{"cluster.etcd.tls.ca_file": t.CAFile, "cluster.etcd.tls.cert_file": t.CertFile, "cluster.etcd.tls.key_file": t.KeyFile} {
			if f != "" {
				if _, err := os.Stat(f); err != nil {
					p.add(key, "%v", err)
				}
			}
		}
	}
	if c.Etcd.Username == "" && c.Etcd.Password != "" {
		p.add("cluster.etcd.username", "is required with a password")
	}
	if c.Etcd.Username != "" && c.Etcd.Password == "" {
		p.add("cluster.etcd.password", "is required with a username (or set PORTWAY_ETCD_PASSWORD)")
	}
	if c.Etcd.RequestTimeout.Duration == 0 && !c.Etcd.RequestTimeout.bad {
		c.Etcd.RequestTimeout = D(DefaultEtcdRequestTimeout)
	}
	p.duration("cluster.etcd.request_timeout", c.Etcd.RequestTimeout, 100*time.Millisecond, 5*time.Minute, false)
	if c.Etcd.LeaseTTL.Duration == 0 && !c.Etcd.LeaseTTL.bad {
		c.Etcd.LeaseTTL = D(DefaultLeaseTTL)
	}
	p.duration("cluster.etcd.lease_ttl", c.Etcd.LeaseTTL, 2*time.Second, 10*time.Minute, false)
	if c.ReplicaID == "" {
		c.ReplicaID, _ = os.Hostname()
	}
	if c.ReplicaID == "" {
		p.add("cluster.replica_id", "is required: the host name is unknown")
	} else if !validReplicaID(c.ReplicaID) {
		p.add("cluster.replica_id", "%q may hold only letters, digits and . _ - (at most 253)", c.ReplicaID)
	}
	if c.Advertise != "" {
		p.hostPort("cluster.advertise", c.Advertise, false)
	}
	if c.Token != "" && len(c.Token) < MinTokenLength {
		p.add("cluster.token", "is shorter than %d characters", MinTokenLength)
	}
}

// checkEndpoint accepts http(s)://host:port or host:port.
func checkEndpoint(e string) error {
	if strings.Contains(e, "://") {
		u, err := url.Parse(e)
		if err != nil {
			return fmt.Errorf("is not a URL: %w", err)
		}
		if u.Scheme != "http" && u.Scheme != "https" {
			return fmt.Errorf("has scheme %q; want http or https", u.Scheme)
		}
		if u.Port() == "" || (u.Path != "" && u.Path != "/") {
			return fmt.Errorf("must be scheme://host:port")
		}
		return nil
	}
	var p problems
	p.hostPort("", e, true)
	if len(p) > 0 || strings.HasSuffix(e, ":") {
		return fmt.Errorf("is not a URL or host:port")
	}
	return nil
}

func validReplicaID(s string) bool {
	if len(s) > 253 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

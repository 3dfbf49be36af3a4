package config

import (
	"os"
	"strings"
	"testing"
	"time"
)

// The cluster: block parses with its defaults, takes its secrets and the
// advertised address from the environment, and is absent (a single gateway
// with its state file) when not written.
func TestGatewayClusterBlock(t *testing.T) {
	g, err := ParseGateway([]byte(`
insecure: true
cluster:
  etcd:
    endpoints: ["http://127.0.0.1:2379", "etcd-1.etcd:2379"]
    username: portway
  advertise: "10.0.0.7:8443"
`), env(map[string]string{"PORTWAY_ETCD_PASSWORD": "etcd-secret", "PORTWAY_CLUSTER_TOKEN": "cluster-token-0123456789"}))
	if err != nil {
		t.Fatal(err)
	}
	c := g.Cluster
	host, _ := os.Hostname()
	if c == nil || c.Etcd.Prefix != DefaultEtcdPrefix || c.Etcd.Password != "etcd-secret" || c.Token != "cluster-token-0123456789" ||
		c.ReplicaID != host || c.Etcd.RequestTimeout.Duration != DefaultEtcdRequestTimeout || c.Etcd.LeaseTTL.Duration != DefaultLeaseTTL ||
		c.Advertise != "10.0.0.7:8443" || len(c.Etcd.Endpoints) != 2 {
		t.Fatalf("cluster block parsed as %+v", c)
	}
	g, err = ParseGateway([]byte(`
insecure: true
cluster:
  etcd: {endpoints: ["http://127.0.0.1:2379"], prefix: /pw/, request_timeout: 2s}
  replica_id: gw-1
`), env(map[string]string{"PORTWAY_CLUSTER_ADVERTISE": "10.0.0.8:8443"}))
	if err != nil {
		t.Fatal(err)
	}
	if c := g.Cluster; c.ReplicaID != "gw-1" || c.Etcd.Prefix != "/pw/" || c.Advertise != "10.0.0.8:8443" || c.Etcd.RequestTimeout.Duration != 2*time.Second {
		t.Fatalf("cluster block parsed as %+v", c)
	}
	g, err = ParseGateway([]byte("insecure: true\n"), env(map[string]string{"PORTWAY_ETCD_PASSWORD": "x", "PORTWAY_CLUSTER_TOKEN": "y"}))
	if err != nil || g.Cluster != nil {
		t.Fatalf("no cluster: block gave %+v, %v", g.Cluster, err)
	}
}

func TestGatewayClusterErrorsNameTheKey(t *testing.T) {
	cases := map[string]string{
		"cluster: {etcd: {}}":                                                        "cluster.etcd.endpoints: is required",
		`cluster: {etcd: {endpoints: ["ftp://h:1"]}}`:                                "cluster.etcd.endpoints[0]:",
		`cluster: {etcd: {endpoints: ["http://h"]}}`:                                 "cluster.etcd.endpoints[0]:",
		`cluster: {etcd: {endpoints: ["h"]}}`:                                        "cluster.etcd.endpoints[0]:",
		`cluster: {etcd: {endpoints: ["h:1"], prefix: portway}}`:                     "cluster.etcd.prefix:",
		`cluster: {etcd: {endpoints: ["h:1"], username: u}}`:                         "cluster.etcd.password: is required",
		`cluster: {etcd: {endpoints: ["h:1"], password: p}}`:                         "cluster.etcd.username: is required",
		`cluster: {etcd: {endpoints: ["h:1"], tls: {cert_file: c}}}`:                 "cluster.etcd.tls: cert_file and key_file",
		`cluster: {etcd: {endpoints: ["h:1"], tls: {ca_file: /nonexistent/ca.pem}}}`: "cluster.etcd.tls.ca_file:",
		`cluster: {etcd: {endpoints: ["h:1"], request_timeout: 1ms}}`:                "cluster.etcd.request_timeout:",
		`cluster: {etcd: {endpoints: ["h:1"], lease_ttl: 1s}}`:                       "cluster.etcd.lease_ttl:",
		`cluster: {etcd: {endpoints: ["h:1"]}, replica_id: "a/b"}`:                   "cluster.replica_id:",
		`cluster: {etcd: {endpoints: ["h:1"]}, advertise: nowhere}`:                  "cluster.advertise:",
		`cluster: {etcd: {endpoints: ["h:1"]}, token: short}`:                        "cluster.token: is shorter",
		`cluster: {etcd: {endpoints: ["h:1"], endpoint: x}}`:                         `unknown key "endpoint"`,
		`cluster: {etcd: {endpoints: "h:1"}}`:                                        "cluster.etcd.endpoints",
	}
	for in, want := range cases {
		_, err := ParseGateway([]byte("insecure: true\n"+in), nil)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: err = %v, want it to contain %q", in, err, want)
		}
	}
}

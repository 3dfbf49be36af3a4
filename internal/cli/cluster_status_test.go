package cli

import (
	"bytes"
	"regexp"
	"testing"

	"github.com/portway/portway/internal/adminapi"
)

// portway status, asked of a replica of a cluster, lists the replicas with
// the agent sessions each holds, and each port with how that replica
// serves it: from a local session, or forwarded to a replica holding one.
func TestStatusShowsCluster(t *testing.T) {
	var out bytes.Buffer
	writeCluster(&out, &adminapi.ClusterInfo{Replica: "gw-2", Forwarding: true,
		Replicas: []adminapi.ReplicaInfo{
			{ID: "gw-1", Advertise: "10.0.0.7:8443", Link: "up", Sessions: []adminapi.ClusterSession{{Agent: "prod-eu", Instance: "a1", Protocol: "yamux"}}},
			{ID: "gw-2", Advertise: "10.0.0.8:8443", Sessions: []adminapi.ClusterSession{{Agent: "staging", Protocol: "json"}}},
		},
		Ports: []adminapi.PortInfo{
			{Protocol: "tcp", Port: 15432, Agent: "prod-eu", Service: "postgres", Live: true, Served: "forwarded", Via: []string{"gw-1"}},
			{Protocol: "udp", Port: 15353, Agent: "staging", Service: "dns", Live: true, Served: "local"},
		}})
	s := out.String()
	for _, want := range []string{
		`(?m)^gw-1\s+10\.0\.0\.7:8443\s+up\s+prod-eu/a1 \(yamux\)`,
		`(?m)^gw-2\s+10\.0\.0\.8:8443\s+self\s+staging \(json\)`,
		`(?m)^tcp/15432\s+prod-eu\s+postgres\s+live\s+forwarded\s+gw-1$`,
		`(?m)^udp/15353\s+staging\s+dns\s+live\s+local\s+-$`,
	} {
		if !regexp.MustCompile(want).MatchString(s) {
			t.Errorf("status lacks %s:\n%s", want, s)
		}
	}
}

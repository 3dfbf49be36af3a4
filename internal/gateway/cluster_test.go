//go:build linux

package gateway

import (
	"context"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/portway/portway/internal/cluster"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/store"
	"github.com/portway/portway/internal/testetcd"
	"github.com/portway/portway/internal/testnet"
	"github.com/portway/portway/internal/testwait"
	"github.com/portway/portway/internal/tunnel"
)

// echoStreams is a fake agent's stream handler that echoes every stream.
func echoStreams(in *tunnel.Incoming) {
	if _, err := in.Header(); err != nil {
		in.Reject(protocol.StatusRefused)
		return
	}
	if st, err := in.Accept(); err == nil {
		io.Copy(st, st)
		st.CloseWrite()
		st.Close()
	}
}

// A gateway with a cluster: block keeps its allocations in etcd and its
// agent sessions in the presence records. When etcd loses quorum, the
// ports it serves keep working, a reconnecting agent keeps its port, a new
// service fails at once with a clear error (within the request timeout,
// not a hang), and all is well again when quorum returns.
func TestGatewayClusterQuorumLoss(t *testing.T) {
	cl := testetcd.Start(t)
	const prefix = "/gw/"
	g := startTestGateway(t, func(c *config.GatewayFile) {
		c.Cluster = &config.Cluster{ReplicaID: "r1", Advertise: "127.0.0.11:8443", Etcd: config.ClusterEtcd{
			Endpoints: cl.Endpoints(), Prefix: prefix, RequestTimeout: config.D(time.Second)}}
	})
	defer g.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	obs, err := clientv3.New(clientv3.Config{Endpoints: cl.Endpoints(), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer obs.Close()
	stored := func() map[string]int {
		all, _, err := store.NewEtcd(obs, prefix, store.Options{}).List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]int{}
		for _, a := range all {
			m[a.Agent+"/"+a.Service] = a.Port
		}
		return m
	}

	pg := tcpSpec("pg", 5432)
	fa, err := connectFakeAgent(ctx, g, "yamux", []protocol.Service{pg}, echoStreams)
	if err != nil {
		t.Fatal(err)
	}
	port := fa.ack.Endpoints[0].PublicPort
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	if e := fa.ack.Endpoints[0]; e.Error != "" || port == 0 {
		t.Fatalf("pg: %+v", e)
	}
	if got := stored(); got["agent-a/pg"] != port || len(got) != 1 {
		t.Fatalf("etcd holds %v, want agent-a/pg on %d", got, port)
	}
	testwait.For(t, 10*time.Second, "the session in the presence records", func() bool {
		v, err := cluster.Read(ctx, obs, prefix)
		return err == nil && len(v.Replicas) == 1 && v.Replicas[0].ID == "r1" && len(v.Sessions) == 1 && v.Sessions[0].Agent == "agent-a"
	})
	if err := testnet.EchoRoundTrip(addr, []byte("before")); err != nil {
		t.Fatal(err)
	}

	cl.Kill(1)
	cl.Kill(2)
	start := time.Now()
	ack := register(t, fa, 2, pg, tcpSpec("redis", 6379))
	took := time.Since(start)
	if e := ack.Endpoints[0]; e.Error != "" || e.PublicPort != port {
		t.Errorf("pg without quorum: %+v, want its port %d", e, port)
	}
	if e := ack.Endpoints[1]; !strings.Contains(e.Error, "allocation store unavailable") {
		t.Errorf("redis without quorum: %+v, want an allocation store error", e)
	}
	t.Logf("registration without quorum answered in %v: %q", took.Round(time.Millisecond), ack.Endpoints[1].Error)
	if err := testnet.EchoRoundTrip(addr, []byte("during")); err != nil {
		t.Fatalf("a served port stopped working without quorum: %v", err)
	}
	// The agent reconnects: the port this gateway holds for it is still
	// its own.
	fa.sess.Close()
	testwait.For(t, 10*time.Second, "the old session's port to close", func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	fa, err = connectFakeAgent(ctx, g, "yamux", []protocol.Service{pg}, echoStreams)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.sess.Close()
	if e := fa.ack.Endpoints[0]; e.Error != "" || e.PublicPort != port {
		t.Fatalf("pg reconnecting without quorum: %+v, want its port %d", e, port)
	}
	if err := testnet.EchoRoundTrip(addr, []byte("reconnected")); err != nil {
		t.Fatal(err)
	}

	cl.Restart(1)
	cl.Restart(2)
	for i := range 3 {
		cl.WaitHealthy(i)
	}
	var redis protocol.Endpoint
	for seq := uint64(3); seq < 30; seq++ {
		ack := register(t, fa, seq, pg, tcpSpec("redis", 6379))
		if redis = ack.Endpoints[1]; redis.Error == "" {
			break
		}
	}
	if redis.Error != "" || redis.PublicPort == 0 {
		t.Fatalf("redis after quorum returned: %+v", redis)
	}
	if got := stored(); got["agent-a/pg"] != port || got["agent-a/redis"] != redis.PublicPort {
		t.Fatalf("etcd holds %v after recovery, want pg on %d and redis on %d", got, port, redis.PublicPort)
	}
	if err := testnet.EchoRoundTrip(net.JoinHostPort("127.0.0.1", strconv.Itoa(redis.PublicPort)), []byte("after")); err != nil {
		t.Fatal(err)
	}

	// Shutting down without quorum does not wait on etcd for long: the
	// lease's revoke and the withdrawals are bounded (a hang guard, well
	// above the few seconds it takes).
	cl.Kill(1)
	cl.Kill(2)
	closed := make(chan struct{})
	start = time.Now()
	go func() {
		g.Close()
		close(closed)
	}()
	select {
	case <-closed:
		t.Logf("closed without quorum in %v", time.Since(start).Round(time.Millisecond))
	case <-time.After(30 * time.Second):
		t.Fatal("the gateway did not close within 30s without quorum")
	}
}

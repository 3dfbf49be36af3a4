package gateway

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/testwait"
	"github.com/portway/portway/internal/tunnel"
)

// A registration withdraws exactly the services it no longer lists: their
// sockets close and their ports stay retained, while the services it
// still lists keep their sockets. When the session ends, every service is
// withdrawn the same way.
func TestWithdrawClosesOnlyWhatIsGone(t *testing.T) {
	g := startTestGateway(t)
	defer g.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	web := protocol.Service{ID: "web", Protocol: protocol.KindTCP, Port: 80}
	dns := udpSpec("dns")
	fa, err := connectFakeAgent(ctx, g, "json", []protocol.Service{web, dns}, holdStreams)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.sess.Close()
	for _, e := range fa.ack.Endpoints {
		if e.Error != "" {
			t.Fatalf("%s/%s not exposed: %s", e.Protocol, e.ID, e.Error)
		}
	}
	webAddr, dnsAddr := fa.ack.Endpoints[0].Address, fa.ack.Endpoints[1].Address

	ack := register(t, fa, 2, web)
	if e := ack.Endpoints[0]; e.Error != "" || e.Address != webAddr {
		t.Fatalf("kept service answered %+v, want its endpoint %s", e, webAddr)
	}
	if c, err := net.DialTimeout("tcp", webAddr, 5*time.Second); err != nil {
		t.Fatalf("kept service's port closed: %v", err)
	} else {
		c.Close()
	}
	// The withdrawn UDP port is closed: it can be bound again.
	if c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(dnsAddr))); err != nil {
		t.Fatalf("withdrawn service's port still open: %v", err)
	} else {
		c.Close()
	}
	if live, retained := held(g.ports, "agent-a"); live != 1 || retained != 1 {
		t.Fatalf("after the withdrawal: %d live and %d retained allocations, want 1 and 1", live, retained)
	}
	if s := g.Services(); len(s) != 1 || s[0].ID != "web" {
		t.Fatalf("admin API lists %+v, want web only", s)
	}

	fa.sess.Close()
	// The sockets close just after the services are forgotten.
	testwait.For(t, 20*time.Second, "the session's end to withdraw every service and close its port", func() bool {
		live, _ := held(g.ports, "agent-a")
		if live != 0 || len(g.Services()) != 0 {
			return false
		}
		c, err := net.DialTimeout("tcp", webAddr, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	if live, retained := held(g.ports, "agent-a"); live != 0 || retained != 2 {
		t.Fatalf("after the session: %d live and %d retained allocations, want 0 and 2", live, retained)
	}
}

// holdStreams is a fake agent's stream handler that accepts every stream
// and holds it until the client goes. A test that dials a port to see that
// it listens uses it: when the agent refuses the stream, the gateway's
// reset can reach the client before its connect has returned.
func holdStreams(in *tunnel.Incoming) {
	if st, err := in.Accept(); err == nil {
		io.Copy(io.Discard, st)
		st.Close()
	}
}

package gateway

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/metrics"
	"github.com/portway/portway/internal/protocol"
)

// BenchmarkUDPDatagramPath is the gateway's per-datagram path for a client
// with a session: look the session up, copy the datagram into a queued
// buffer (charged to the budgets), and take it off the queue as the relay
// does. It must allocate nothing.
func BenchmarkUDPDatagramPath(b *testing.B) {
	for _, size := range []int{64, 513, 1400} {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			us, s := benchUDPService()
			data := make([]byte, size)
			out := make([]byte, protocol.MaxDatagram)
			b.ReportAllocs()
			b.SetBytes(int64(size))
			for b.Loop() {
				us.handle(s.client, data)
				if _, err := s.ReadDatagram(out); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Steady state allocates nothing (checked in the default test run, not
// only when benchmarking).
func TestUDPDatagramPathAllocatesNothing(t *testing.T) {
	us, s := benchUDPService()
	data := make([]byte, 513)
	out := make([]byte, protocol.MaxDatagram)
	if n := testing.AllocsPerRun(1000, func() {
		us.handle(s.client, data)
		s.ReadDatagram(out)
	}); n != 0 {
		t.Fatalf("%v allocations per datagram", n)
	}
	if us.queued.Load() != 0 || us.budget.queued.Load() != 0 {
		t.Fatalf("budget not given back: %d / %d bytes", us.queued.Load(), us.budget.queued.Load())
	}
}

// benchUDPService is a UDP service with one client session and no socket
// or tunnel: just the per-datagram structures.
func benchUDPService() (*udpService, *udpSession) {
	cfg := config.DefaultGateway()
	a := newAgentState("agent-a", 1)
	us := &udpService{
		serviceBase: &serviceBase{agent: a.name, key: protocol.ServiceKey{ID: "dns", Kind: protocol.KindUDP},
			conf:    func() *config.GatewayFile { return cfg },
			metrics: metrics.NewGateway(prometheus.NewRegistry()), done: make(chan struct{})},
		budget:   &udpBudget{},
		sessions: newUDPSessions(),
	}
	us.spec.Store(&protocol.Service{ID: "dns", Protocol: protocol.KindUDP, Port: 53})
	client := netip.MustParseAddrPort("127.0.0.1:5353")
	s := &udpSession{us: us, client: client, queue: make(chan *[]byte, udpQueueLen), done: make(chan struct{})}
	us.sessions.m[client] = s
	return us, s
}

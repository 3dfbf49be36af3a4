package e2e

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/testnet"
	"github.com/portway/portway/internal/testwait"
)

// rawRegistrar is a raw agent session (see rawAgent) that registers what a
// real agent would not, answering the gateway's heartbeats meanwhile.
type rawRegistrar struct {
	ws   *websocket.Conn
	mu   sync.Mutex // serializes writes
	acks chan *protocol.RegisterAck
	seq  uint64
}

func newRawRegistrar(t *testing.T, ws *websocket.Conn) *rawRegistrar {
	r := &rawRegistrar{ws: ws, acks: make(chan *protocol.RegisterAck, 1)}
	go func() {
		defer close(r.acks)
		for {
			_, msg, err := ws.ReadMessage()
			if err != nil {
				return // closed by the test's cleanup or the gateway
			}
			switch m := decodeOrNil(msg).(type) {
			case *protocol.RegisterAck:
				r.acks <- m
			case *protocol.Heartbeat:
				r.send((*protocol.HeartbeatAck)(m))
			}
		}
	}()
	return r
}

func decodeOrNil(b []byte) protocol.Message {
	m, _ := protocol.Decode(b)
	return m
}

func (r *rawRegistrar) send(m protocol.Message) error {
	b, err := protocol.Encode(m)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ws.WriteMessage(websocket.TextMessage, b)
}

// register sends services and returns the gateway's register_ack.
func (r *rawRegistrar) register(t *testing.T, services []protocol.Service) *protocol.RegisterAck {
	t.Helper()
	r.seq++
	if err := r.send(&protocol.Register{Seq: r.seq, Services: services}); err != nil {
		t.Fatal(err)
	}
	timeout := time.After(10 * time.Second)
	for {
		select {
		case ack, ok := <-r.acks:
			if !ok {
				t.Fatalf("session closed while waiting for register_ack %d", r.seq)
			}
			if ack.Seq == r.seq {
				return ack
			}
		case <-timeout:
			t.Fatalf("no register_ack %d within 10s", r.seq)
		}
	}
}

// A token holder that keeps changing its service ids holds at most its
// live services plus max_retained_ports, and when the range is full a new
// service takes the churner's oldest retained port: another agent always
// gets its ports, and gets them back after a reconnect.
func TestServiceIDChurnCannotExhaustPorts(t *testing.T) {
	// 8 ports; agent-a may hold 2 live + 4 retained, agent-b needs 3.
	g := startGateway(t, func(c *config.GatewayFile) {
		c.PortRange, c.MaxServices = "28300-28307", 3
		c.Agents[0].MaxServices = 2 // agent-a: 2 live, and by default 2×2 retained
	})
	churner := newRawRegistrar(t, rawAgent(t, g, tokenA, "json"))
	rounds := 0
	var refused []string // the churner's services, checked last
	round := func(n int) {
		for i := 0; i < n; i++ {
			rounds++
			var svcs []protocol.Service
			for j := 0; j < 2; j++ {
				svcs = append(svcs, protocol.Service{ID: fmt.Sprintf("churn-%d-%d", rounds, j), Protocol: protocol.KindTCP, Port: 80 + j})
			}
			for _, ep := range churner.register(t, svcs).Endpoints {
				if ep.Error != "" {
					refused = append(refused, ep.ID+": "+ep.Error)
				}
			}
		}
	}
	round(20)

	echo := echoBackend(t)
	services := []config.StaticService{
		{Name: "web", Protocol: "tcp", Port: 80, Backend: echo},
		{Name: "db", Protocol: "tcp", Port: 5432, Backend: echo},
		{Name: "cache", Protocol: "tcp", Port: 6379, Backend: echo},
	}
	b := startAgent(t, g.url(), tokenB, "yamux", services)
	eps := b.waitReady(t)
	for id, ep := range eps {
		if strings.HasPrefix(ep, "error") {
			t.Fatalf("agent-b's %s: %s", id, ep)
		}
		if err := testnet.EchoRoundTrip(ep, []byte("through "+id)); err != nil {
			t.Fatalf("agent-b's %s: %v", id, err)
		}
	}
	metrics := testmetrics.Scrape(t, "http://"+g.AdminAddr().String()+"/metrics")
	capped := testmetrics.Sum(metrics, "portway_gateway_port_evictions_total", map[string]string{"reason": "agent_cap"})
	full := testmetrics.Sum(metrics, "portway_gateway_port_evictions_total", map[string]string{"reason": "range_full"})
	t.Logf("evictions after 20 rounds and agent-b: agent_cap %v, range_full %v", capped, full)
	if capped < 1 || full < 1 {
		t.Errorf("evictions agent_cap %v, range_full %v: want both counted", capped, full)
	}

	// agent-b goes away; the churner goes on in the full range, taking its
	// own retained ports, not agent-b's; agent-b comes back to the same ports.
	b.stop()
	testwait.For(t, 5*time.Second, "agent-b's listeners to close", func() bool {
		return testmetrics.Sum(testmetrics.Scrape(t, "http://"+g.AdminAddr().String()+"/metrics"), "portway_gateway_services", map[string]string{"protocol": "tcp"}) == 2
	})
	round(10)
	b2 := startAgent(t, g.url(), tokenB, "json", services)
	for id, ep := range b2.waitReady(t) {
		if ep != eps[id] {
			t.Errorf("agent-b's %s came back on %s, was %s", id, ep, eps[id])
		}
	}
	// Within its quota the churner is served too, from its own retained ports.
	if len(refused) > 0 {
		t.Errorf("%d of the churner's services refused, first %s", len(refused), refused[0])
	}
}

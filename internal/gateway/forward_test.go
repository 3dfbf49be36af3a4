//go:build linux

package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/gorilla/websocket"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/cluster"
	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/protocol"
	"github.com/portway/portway/internal/testetcd"
	"github.com/portway/portway/internal/testlog"
	"github.com/portway/portway/internal/testnet"
	"github.com/portway/portway/internal/testwait"
	"github.com/portway/portway/internal/tunnel"
)

const clusterToken = "cluster-token-0123456789abcdef"

// replicaGateway is one replica of a test cluster: bound on its own
// loopback address, with the public ports at the same numbers as the
// others'.
type replicaGateway struct {
	*Gateway
	ip  string
	reg *prometheus.Registry
}

// startReplica starts replica id on ip, in the etcd cluster cl under
// prefix, with the cluster token token.
func startReplica(t *testing.T, cl *testetcd.Cluster, prefix, id, ip, token string, opts ...func(*config.GatewayFile)) *replicaGateway {
	t.Helper()
	// The agents' listener is also the advertised link address: its
	// port must be known before the replica joins.
	ln, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Skipf("loopback address %s: %v", ip, err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cfg := config.DefaultGateway()
	cfg.Listen = addr
	cfg.PublicHost = ip
	cfg.BindAddress = ip
	cfg.StateFile = ""
	cfg.Insecure = true
	cfg.HeartbeatInterval = config.D(time.Second)
	cfg.PortRange = "24000-24099"
	cfg.Agents = []config.AgentIdentity{{Name: "agent-a", Token: testToken}}
	cfg.Admin = config.Admin{Listen: ip + ":0", Token: "admin-token-0123456789"}
	cfg.Cluster = &config.Cluster{ReplicaID: id, Advertise: addr, Token: token, Etcd: config.ClusterEtcd{
		Endpoints: cl.Endpoints(), Prefix: prefix, RequestTimeout: config.D(2 * time.Second), LeaseTTL: config.D(2 * time.Second)}}
	for _, o := range opts {
		o(cfg)
	}
	log, _ := testlog.New(t, id)
	reg := prometheus.NewRegistry()
	g, err := New(Options{Config: cfg, Logger: log, Registry: reg, Gatherer: reg})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	return &replicaGateway{Gateway: g, ip: ip, reg: reg}
}

// adminJSON decodes the answer of r's admin API at path into v.
func adminJSON(t *testing.T, r *replicaGateway, path string, v any) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+r.AdminAddr().String()+path, nil)
	req.Header.Set("Authorization", "Bearer admin-token-0123456789")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("admin %s: HTTP %d", path, resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatal(err)
	}
}

func (r *replicaGateway) addr(port int) string { return net.JoinHostPort(r.ip, strconv.Itoa(port)) }

// udpEcho sends payload to addr and reports whether it came back.
func udpEcho(addr string, payload []byte) error {
	c, err := net.Dial("udp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write(payload); err != nil {
		return err
	}
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	if string(buf[:n]) != string(payload) {
		return fmt.Errorf("got %q back, want %q", buf[:n], payload)
	}
	return nil
}

// echoAll is a fake agent's stream handler that echoes TCP streams byte
// for byte and UDP streams datagram for datagram, in either mode.
func echoAll(in *tunnel.Incoming) {
	h, err := in.Header()
	if err != nil {
		in.Reject(protocol.StatusRefused)
		return
	}
	st, err := in.Accept()
	if err != nil {
		return
	}
	defer st.Close()
	if h.Kind != protocol.KindUDP {
		io.Copy(st, st)
		st.CloseWrite()
		return
	}
	pc := tunnel.AsPackets(st)
	buf := make([]byte, tunnel.PacketHeadroom+2048)
	for {
		n, err := pc.ReadPacket(buf[tunnel.PacketHeadroom:])
		if err != nil || pc.WritePacket(buf[:tunnel.PacketHeadroom+n]) != nil {
			return
		}
	}
}

// Three replicas share one etcd; the agent holds a session to the first
// only. Clients of the second and third reach it all the same, TCP and
// UDP, their connections forwarded over the replicas' links; when the
// agent's other instance holds a session to the third and the first goes
// away, clients keep working through the others.
func TestForwardBetweenReplicas(t *testing.T) {
	cl := testetcd.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, mode := range []string{"yamux", "json"} {
		t.Run(mode, func(t *testing.T) {
			prefix := "/fwd-" + mode + "/"
			r1 := startReplica(t, cl, prefix, "r1", "127.0.0.11", clusterToken)
			r2 := startReplica(t, cl, prefix, "r2", "127.0.0.12", clusterToken)
			r3 := startReplica(t, cl, prefix, "r3", "127.0.0.13", clusterToken)
			services := []protocol.Service{tcpSpec("echo", 7), {ID: "dns", Protocol: protocol.KindUDP, Port: 53}}
			fa, err := connectFakeAgent(ctx, r1.Gateway, mode, services, echoAll)
			if err != nil {
				t.Fatal(err)
			}
			defer fa.sess.Close()
			tcpPort, udpPort := fa.ack.Endpoints[0].PublicPort, fa.ack.Endpoints[1].PublicPort
			if tcpPort == 0 || udpPort == 0 {
				t.Fatalf("register ack: %+v", fa.ack.Endpoints)
			}
			for _, r := range []*replicaGateway{r1, r2, r3} {
				testwait.For(t, 15*time.Second, r.ip+" to serve the agent's TCP port", func() bool {
					return testnet.EchoRoundTrip(r.addr(tcpPort), []byte("hello "+r.ip)) == nil
				})
				if err := udpEcho(r.addr(udpPort), []byte("dns "+r.ip)); err != nil {
					t.Fatalf("UDP through %s: %v", r.ip, err)
				}
			}
			for _, r := range []*replicaGateway{r2, r3} {
				if n := counterValue(r.metrics.Forwarded.WithLabelValues("agent-a", "echo")); n < 1 {
					t.Errorf("%s forwarded %v TCP connections, want at least 1", r.ip, n)
				}
				if got := r.fabric.servedBy(keyOf(protocol.KindTCP, tcpPort)); got != "forwarded" {
					t.Errorf("%s serves the port %q, want forwarded", r.ip, got)
				}
			}
			// The admin API of r2: the replicas, who holds the agent, and
			// the port served by forwarding to r1.
			var ci adminapi.ClusterInfo
			adminJSON(t, r2, adminapi.ClusterPath, &ci)
			var holders []string
			for _, r := range ci.Replicas {
				for _, s := range r.Sessions {
					if s.Agent == "agent-a" {
						holders = append(holders, r.ID)
					}
				}
			}
			if ci.Replica != "r2" || len(ci.Replicas) != 3 || fmt.Sprint(holders) != "[r1]" {
				t.Errorf("r2's cluster view: %+v, want 3 replicas and agent-a on r1 only", ci)
			}
			found := false
			for _, p := range ci.Ports {
				if p.Protocol == "tcp" && p.Port == tcpPort {
					found = true
					if p.Served != "forwarded" || fmt.Sprint(p.Via) != "[r1]" || !p.Live {
						t.Errorf("r2 reports the TCP port as %+v, want live, forwarded via r1", p)
					}
				}
			}
			if !found {
				t.Errorf("r2 reports no TCP port %d: %+v", tcpPort, ci.Ports)
			}
			if n := counterValue(r1.metrics.Forwarded.WithLabelValues("agent-a", "echo")); n != 0 {
				t.Errorf("the agent's own replica forwarded %v connections", n)
			}
			if got := r1.fabric.servedBy(keyOf(protocol.KindTCP, tcpPort)); got != "local" {
				t.Errorf("r1 serves the port %q, want local", got)
			}

			// A second instance of the agent on r3; then r1 goes away.
			fb, err := connectFakeAgentInstance(ctx, r3.Gateway, mode, "second", services, echoAll)
			if err != nil {
				t.Fatal(err)
			}
			defer fb.sess.Close()
			if e := fb.ack.Endpoints[0]; e.Error != "" || e.PublicPort != tcpPort {
				t.Fatalf("second instance on r3: %+v, want port %d", e, tcpPort)
			}
			testwait.For(t, 10*time.Second, "r3 to serve the port itself", func() bool {
				return r3.fabric.servedBy(keyOf(protocol.KindTCP, tcpPort)) == "local"
			})
			r1.Close()
			for _, r := range []*replicaGateway{r2, r3} {
				testwait.For(t, 15*time.Second, r.ip+" to reach the agent without r1", func() bool {
					return testnet.EchoRoundTrip(r.addr(tcpPort), []byte("after r1 "+r.ip)) == nil &&
						udpEcho(r.addr(udpPort), []byte("dns after r1 "+r.ip)) == nil
				})
			}
		})
	}
}

// connectFakeAgentInstance opens a tunnel as agent-a's instance instance
// ("": an agent that sends none), registers services and waits for the
// acknowledgement. accept handles the streams the gateway opens (nil:
// refuse them all).
func connectFakeAgentInstance(ctx context.Context, g *Gateway, mode, instance string, services []protocol.Service, accept func(*tunnel.Incoming)) (*fakeAgent, error) {
	ws, err := tunnel.Dial(ctx, "ws://"+g.TunnelAddr().String()+tunnel.Path, tunnel.DialOptions{Token: testToken})
	if err != nil {
		return nil, err
	}
	sess, err := tunnel.Client(ctx, ws, tunnel.Config{Protocol: mode, Instance: instance})
	if err != nil {
		return nil, err
	}
	if accept == nil {
		accept = func(in *tunnel.Incoming) { in.Reject(protocol.StatusRefused) }
	}
	go func() {
		for {
			in, err := sess.Accept(context.Background())
			if err != nil {
				return
			}
			go accept(in)
		}
	}()
	if err := sess.Send(&protocol.Register{Seq: 1, Services: services}); err != nil {
		sess.Close()
		return nil, err
	}
	for {
		select {
		case m := <-sess.Control():
			if ack, ok := m.(*protocol.RegisterAck); ok {
				return &fakeAgent{sess: sess, ack: ack}, nil
			}
		case <-sess.Done():
			return nil, fmt.Errorf("session ended before the register ack: %w", sess.Err())
		case <-ctx.Done():
			sess.Close()
			return nil, ctx.Err()
		}
	}
}

// Each end of a link proves it knows the cluster token, without sending
// it: an accepter refuses a dialer whose proof is wrong, a dialer refuses
// an accepter whose proof is wrong, and two replicas with the same token
// link up.
func TestClusterLinkAuth(t *testing.T) {
	cl := testetcd.Start(t)
	r1 := startReplica(t, cl, "/auth/", "r1", "127.0.0.11", clusterToken)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// A dialer with another token.
	ws, _, err := websocket.DefaultDialer.DialContext(ctx, "ws://"+r1.cfg.Cluster.Advertise+clusterPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	var theirs linkAuth
	if err := ws.ReadJSON(&theirs); err != nil || theirs.Replica != "r1" || theirs.Nonce == "" {
		t.Fatalf("accepter's challenge: %+v, %v", theirs, err)
	}
	wrong := []byte(clusterToken + "-other")
	ws.WriteJSON(linkAuth{Replica: "evil", Nonce: "n1", MAC: linkMAC(wrong, macDialer, "evil", "r1", "n1", theirs.Nonce, nil)})
	var proof linkAuth
	if err := ws.ReadJSON(&proof); err == nil {
		t.Fatalf("the accepter answered a wrong proof with %+v", proof)
	}
	if n := counterValue(r1.metrics.AuthFailures.WithLabelValues("bad_token")); n != 1 {
		t.Errorf("bad_token auth failures: %v, want 1", n)
	}

	// An accepter with another token: it answers with a proof made with
	// it, and the dialer refuses the link.
	up := websocket.Upgrader{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		defer ws.Close()
		ws.WriteJSON(linkAuth{Replica: "r9", Nonce: "n9"})
		var hello linkAuth
		if ws.ReadJSON(&hello) != nil {
			return
		}
		ws.WriteJSON(linkAuth{MAC: linkMAC(wrong, macAccepter, hello.Replica, "r9", hello.Nonce, "n9", nil)})
		ws.ReadMessage()
	}))
	defer srv.Close()
	addr := srv.Listener.Addr().String()
	if _, err := r1.fabric.dialLink(ctx, cluster.Replica{ID: "r9", Advertise: addr}); !errors.Is(err, errLinkAuth) {
		t.Fatalf("link to an accepter with another token: %v, want %v", err, errLinkAuth)
	}

	// The same token: the link works.
	r3 := startReplica(t, cl, "/auth/", "r3", "127.0.0.13", clusterToken)
	sess, err := r3.fabric.dialLink(ctx, cluster.Replica{ID: "r1", Advertise: r1.cfg.Cluster.Advertise})
	if err != nil {
		t.Fatalf("link with the right token: %v", err)
	}
	sess.Close()
}

// Under tls the link is wss: the dialler accepts a certificate that does
// not name the replica's address (replicas are reached by address), and
// the proofs are bound to the TLS connection.
func TestClusterLinkOverTLS(t *testing.T) {
	cl := testetcd.Start(t)
	withTLS := func(c *config.GatewayFile) {
		c.Insecure = false
		c.TLS = writeSelfSigned(t, t.TempDir(), 1, time.Now().Add(24*time.Hour))
	}
	r1 := startReplica(t, cl, "/tls/", "r1", "127.0.0.11", clusterToken, withTLS)
	r2 := startReplica(t, cl, "/tls/", "r2", "127.0.0.12", clusterToken, withTLS)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sess, err := r2.fabric.dialLink(ctx, cluster.Replica{ID: "r1", Advertise: r1.cfg.Cluster.Advertise})
	if err != nil {
		t.Fatalf("link over TLS: %v", err)
	}
	sess.Close()
}

// Churn on the new multi-lock path: links drop while connections are
// being forwarded over them. The forwarded connections end, new ones
// find a fresh link, and the replica's locks stay free (its liveness
// check passes).
func TestForwardLinkDropsWhileForwarding(t *testing.T) {
	cl := testetcd.Start(t)
	r1 := startReplica(t, cl, "/churn/", "r1", "127.0.0.11", clusterToken)
	r2 := startReplica(t, cl, "/churn/", "r2", "127.0.0.12", clusterToken)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	fa, err := connectFakeAgent(ctx, r1.Gateway, "yamux", []protocol.Service{tcpSpec("echo", 7), udpSpec("dns")}, echoAll)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.sess.Close()
	port, udpPort := fa.ack.Endpoints[0].PublicPort, fa.ack.Endpoints[1].PublicPort
	testwait.For(t, 15*time.Second, "r2 to forward", func() bool {
		return testnet.EchoRoundTrip(r2.addr(port), []byte("x")) == nil
	})
	for round := range 5 {
		// Connections in flight through r2.
		var conns []net.Conn
		for range 8 {
			c, err := net.DialTimeout("tcp", r2.addr(port), 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			conns = append(conns, c)
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 4)
			if _, err := io.ReadFull(c, buf); err != nil {
				t.Fatalf("round %d: forwarded echo: %v", round, err)
			}
		}
		// Drop every link of r2 while they are open.
		r2.fabric.mu.Lock()
		var drop []*link
		for _, l := range r2.fabric.links {
			drop = append(drop, l)
		}
		r2.fabric.mu.Unlock()
		if len(drop) == 0 {
			t.Fatalf("round %d: r2 has no link to r1", round)
		}
		for _, l := range drop {
			<-l.ready
			if l.sess != nil {
				l.sess.Close()
			}
		}
		for _, c := range conns {
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.Copy(io.Discard, c); err != nil && !isReset(err) {
				t.Errorf("round %d: a forwarded connection did not end with its link: %v", round, err)
			}
			c.Close()
		}
		testwait.For(t, 10*time.Second, "a new link", func() bool {
			return testnet.EchoRoundTrip(r2.addr(port), []byte("again")) == nil
		})
		if stuck := r2.stuckLock(2 * time.Second); stuck != "" {
			t.Fatalf("round %d: r2's %s stays held", round, stuck)
		}
	}

	// r2's view says no replica holds the agent (as after the replica
	// holding it died, before its allocation is withdrawn): a client is
	// refused at once and counted, its datagrams dropped and counted.
	testwait.For(t, 10*time.Second, "r2 to forward UDP", func() bool {
		return udpEcho(r2.addr(udpPort), []byte("d")) == nil
	})
	// Counted from here: while r2's view of the presence trailed its
	// view of the allocations, at the start, it may have refused some.
	noReplica := r2.metrics.Refusals.WithLabelValues("agent-a", "echo", "no_replica")
	udpNoReplica := r2.metrics.Refusals.WithLabelValues("agent-a", "dns", "no_replica")
	tcpBefore, udpBefore := counterValue(noReplica), counterValue(udpNoReplica)
	r2.fabric.mu.Lock()
	delete(r2.fabric.sessions, "agent-a")
	r2.fabric.mu.Unlock()
	// The refusal may reach the client before its dial returns.
	if c, err := net.DialTimeout("tcp", r2.addr(port), 2*time.Second); err == nil {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write([]byte("anyone?"))
		if n, err := c.Read(make([]byte, 8)); err == nil || isTimeout(err) {
			t.Fatalf("a client with nobody to forward to got %d bytes, err %v; want it refused", n, err)
		}
		c.Close()
	}
	testwait.For(t, 5*time.Second, "the refusal to be counted", func() bool { return counterValue(noReplica) > tcpBefore })
	if n := counterValue(noReplica) - tcpBefore; n != 1 {
		t.Errorf("no_replica refusals: %v, want 1", n)
	}
	if err := udpEcho(r2.addr(udpPort), []byte("from a new client")); err == nil {
		t.Error("a datagram was answered with nobody to forward to")
	}
	if n := counterValue(udpNoReplica) - udpBefore; n != 1 {
		t.Errorf("UDP no_replica refusals: %v, want 1", n)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func isReset(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne) && !ne.Timeout()
}

// FuzzCheckDialer feeds the accepter's check arbitrary dialer messages: it
// never panics, and accepts only a message whose MAC is the proof for its
// own id and nonce.
func FuzzCheckDialer(f *testing.F) {
	token := []byte(clusterToken)
	good, _ := json.Marshal(linkAuth{Replica: "r2", Nonce: "n2", MAC: linkMAC(token, macDialer, "r2", "r1", "n2", "n1", nil)})
	f.Add(good)
	f.Add([]byte(`{"replica":"r2","nonce":"n2","mac":""}`))
	f.Add([]byte(`{"replica":"","nonce":"","mac":"00"}`))
	f.Add([]byte(`not json`))
	f.Fuzz(func(t *testing.T, msg []byte) {
		hello, ok := checkDialer(token, "r1", msg, "n1", nil)
		if ok && hello.MAC != linkMAC(token, macDialer, hello.Replica, "r1", hello.Nonce, "n1", nil) {
			t.Fatalf("accepted %q without its proof", msg)
		}
		if ok && (hello.Replica == "" || hello.Nonce == "") {
			t.Fatalf("accepted %q without an id or nonce", msg)
		}
	})
}

// A port another process holds on a replica's address when the agent
// registers elsewhere (a gateway still shutting down, say) is mirrored
// there once it is free, though nothing changes in the store meanwhile.
func TestMirrorBoundOnceThePortIsFree(t *testing.T) {
	cl := testetcd.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const port = 24050
	r1 := startReplica(t, cl, "/mirror-retry/", "r1", "127.0.0.11", clusterToken)
	r2 := startReplica(t, cl, "/mirror-retry/", "r2", "127.0.0.12", clusterToken)
	busy, err := net.Listen("tcp", r2.addr(port))
	if err != nil {
		t.Skipf("cannot hold %s: %v", r2.addr(port), err)
	}
	defer busy.Close()
	svc := tcpSpec("echo", 7)
	svc.PublicPort = port
	fa, err := connectFakeAgent(ctx, r1.Gateway, "yamux", []protocol.Service{svc}, echoAll)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.sess.Close()
	if e := fa.ack.Endpoints[0]; e.Error != "" || e.PublicPort != port {
		t.Fatalf("register ack: %+v, want port %d", e, port)
	}
	testwait.For(t, 15*time.Second, "r1 to serve the port", func() bool {
		return testnet.EchoRoundTrip(r1.addr(port), []byte("via r1")) == nil
	})
	testwait.For(t, 15*time.Second, "r2 to try the port and fail", func() bool {
		r2.fabric.mu.Lock()
		defer r2.fabric.mu.Unlock()
		return r2.fabric.bindFailed[keyOf(protocol.KindTCP, port)]
	})
	// Let the registration's last store events pass while the port is
	// still held, so that only a retry can bind it afterwards.
	time.Sleep(2 * time.Second)
	busy.Close()
	testwait.For(t, 15*time.Second, "r2 to serve the freed port", func() bool {
		return testnet.EchoRoundTrip(r2.addr(port), []byte("via r2")) == nil
	})
}

package e2e

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/portway/portway/internal/config"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/testwait"
)

// Traffic that differs in size each way is counted each way on both sides:
// what the client sends is the agent's "received" and the gateway's "in",
// what the backend answers is the agent's "sent" and the gateway's "out",
// for TCP bytes and for UDP datagrams alike. (An echo cannot tell the
// directions apart.)
func TestDirectionsAreCountedByRole(t *testing.T) {
	const (
		request = 30000 // bytes the client sends
		reply   = 7000  // bytes the backend answers, once the request ended
		sends   = 3     // datagrams the client sends
		answers = 2     // datagrams the backend answers to each
	)
	// A TCP backend that reads the request to its end, then answers.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				if n, err := io.Copy(io.Discard, c); err != nil || n != request {
					return
				}
				c.Write(make([]byte, reply))
			}()
		}
	}()
	// A UDP backend that answers each datagram twice.
	uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { uc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := uc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			for range answers {
				uc.WriteToUDPAddrPort(buf[:n], from)
			}
		}
	}()

	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			g := startGateway(t)
			a := startAgent(t, g.url(), tokenA, mode, []config.StaticService{
				{Name: "asym", Protocol: "tcp", Port: 7, Backend: ln.Addr().String()},
				{Name: "uasym", Protocol: "udp", Port: 7, Backend: uc.LocalAddr().String()},
			})
			eps := a.waitReady(t)

			c, err := net.Dial("tcp", eps["asym"])
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.Write(make([]byte, request)); err != nil {
				t.Fatal(err)
			}
			c.(*net.TCPConn).CloseWrite()
			got, err := io.ReadAll(c)
			if err != nil || len(got) != reply {
				t.Fatalf("read %d bytes (%v), want the %d-byte reply", len(got), err, reply)
			}

			u := udpClient(t, eps["udp/uasym"])
			buf := make([]byte, 2048)
			u.SetReadDeadline(time.Now().Add(10 * time.Second))
			for range sends {
				if _, err := u.Write(make([]byte, 100)); err != nil {
					t.Fatal(err)
				}
				for range answers {
					if _, err := u.Read(buf); err != nil {
						t.Fatalf("answer: %v", err)
					}
				}
			}

			agentURL := "http://" + a.MetricsAddr().String() + "/metrics"
			gwURL := "http://" + g.AdminAddr().String() + "/metrics"
			testwait.For(t, 10*time.Second, "the connection to close on both sides", func() bool {
				return testmetrics.Sum(testmetrics.Scrape(t, agentURL), "pipeops_agent_tcp_tunnel_active_connections", nil) == 0 &&
					testmetrics.Sum(testmetrics.Scrape(t, gwURL), "portway_gateway_connections_active", nil) == 0
			})
			// A datagram is counted just after it is written on, so the
			// last answers may reach the client a moment before their
			// count: wait (bounded) for the totals to settle, then check.
			am, gm := testmetrics.Scrape(t, agentURL), testmetrics.Scrape(t, gwURL)
			for i := 0; i < 100 && testmetrics.Sum(am, "pipeops_agent_udp_tunnel_packets_total", nil)+
				testmetrics.Sum(gm, "portway_gateway_udp_packets_total", nil) < 2*(sends+sends*answers); i++ {
				time.Sleep(50 * time.Millisecond)
				am, gm = testmetrics.Scrape(t, agentURL), testmetrics.Scrape(t, gwURL)
			}
			for _, c := range []struct {
				side, metric, service, direction string
				want                             float64
			}{
				{"agent", "pipeops_agent_tcp_tunnel_bytes_total", "asym", "received", request},
				{"agent", "pipeops_agent_tcp_tunnel_bytes_total", "asym", "sent", reply},
				{"gateway", "portway_gateway_bytes_total", "asym", "in", request},
				{"gateway", "portway_gateway_bytes_total", "asym", "out", reply},
				{"agent", "pipeops_agent_udp_tunnel_packets_total", "uasym", "received", sends},
				{"agent", "pipeops_agent_udp_tunnel_packets_total", "uasym", "sent", sends * answers},
				{"gateway", "portway_gateway_udp_packets_total", "uasym", "in", sends},
				{"gateway", "portway_gateway_udp_packets_total", "uasym", "out", sends * answers},
			} {
				m := am
				if c.side == "gateway" {
					m = gm
				}
				if got := testmetrics.Sum(m, c.metric, map[string]string{"service": c.service, "direction": c.direction}); got != c.want {
					t.Errorf("%s %s{direction=%q} = %v, want %v", c.side, c.metric, c.direction, got, c.want)
				}
			}
		})
	}
}

package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/portway/portway/internal/adminapi"
	"github.com/portway/portway/internal/testmetrics"
	"github.com/portway/portway/internal/testnet"
	"github.com/portway/portway/internal/testwait"
)

// Sizes of the reliability scenarios. CI runs trimmed sizes; PORTWAY_FULL=1
// runs the full ones whose figures docs/reliability.md reports.
func full() bool { return os.Getenv("PORTWAY_FULL") != "" }

func pick[T any](trimmed, fullSize T) T {
	if full() {
		return fullSize
	}
	return trimmed
}

// patternSource serves: read an 8-byte size, write that many bytes of a
// position-dependent pattern, close.
func patternSource(t *testing.T) string {
	return testnet.ServeTCP(t, func(c net.Conn) {
		defer c.Close()
		var hdr [8]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		n := int64(binary.BigEndian.Uint64(hdr[:]))
		buf := make([]byte, 64<<10)
		for off := int64(0); off < n; {
			k := min(int64(len(buf)), n-off)
			fillPattern(buf[:k], off)
			if _, err := c.Write(buf[:k]); err != nil {
				return
			}
			off += k
		}
	})
}

func fillPattern(b []byte, off int64) {
	for i := range b {
		b[i] = byte((off + int64(i)) * 31 >> 3)
	}
}

// download asks the source for n bytes through addr and verifies them,
// reading at most bytesPerSec (0: as fast as possible).
func download(addr string, n int64, bytesPerSec int64, deadline time.Duration) error {
	return downloadHeld(addr, n, bytesPerSec, deadline, nil)
}

// hold pauses a download: once it has read at bytes, it closes reached and
// reads nothing more until release is closed, then reads the rest as fast
// as it can.
type hold struct {
	at               int64
	reached, release chan struct{}
}

// downloadHeld is download with an optional hold.
func downloadHeld(addr string, n int64, bytesPerSec int64, deadline time.Duration, h *hold) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(deadline))
	var hdr [8]byte
	binary.BigEndian.PutUint64(hdr[:], uint64(n))
	if _, err := c.Write(hdr[:]); err != nil {
		return err
	}
	buf := make([]byte, 64<<10)
	want := make([]byte, 64<<10)
	start := time.Now()
	var off int64
	for off < n {
		if h != nil && off >= h.at {
			close(h.reached)
			<-h.release
			h = nil
			// The hold is what the test needed of the slow reader: the
			// rest is read at full speed.
			bytesPerSec = 0
		}
		chunk := buf
		if bytesPerSec > 0 {
			chunk = buf[:16<<10]
			// Pace: never ahead of bytesPerSec.
			if ahead := time.Duration(float64(off)/float64(bytesPerSec)*float64(time.Second)) - time.Since(start); ahead > 0 {
				time.Sleep(ahead)
			}
		}
		if h != nil {
			chunk = chunk[:min(int64(len(chunk)), max(h.at-off, 1))]
		}
		k, err := c.Read(chunk)
		fillPattern(want[:k], off)
		if !bytes.Equal(chunk[:k], want[:k]) {
			return fmt.Errorf("corrupted data at offset %d", off)
		}
		off += int64(k)
		if err == io.EOF && off == n {
			break
		}
		if err != nil {
			return fmt.Errorf("after %d of %d bytes: %w", off, n, err)
		}
	}
	return nil
}

// A client reading at ~1 MB/s does not stall a full-speed client on the same
// tunnel, and neither process buffers the slow one's backlog. The overlap
// is certain by design, not by speed: the slow client stops reading after
// its first MiB and stays stopped until the fast download is done.
func TestSlowReaderDoesNotStallOthers(t *testing.T) {
	src := patternSource(t)
	slowBytes := pick[int64](6<<20, 1<<30)
	fastBytes := pick[int64](256<<20, 1<<30)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			pg := newProcGateway(t, "1s")
			gwp := pg.start(t)
			agp := startAgentProc(t, pg.url(), mode, "127.0.0.1:0", fmt.Sprintf("  - {name: src, port: 9000, backend: %q}\n", src), "")
			ep := waitProcEndpoint(t, pg, "src")

			slowDone := make(chan error, 1)
			h := &hold{at: 1 << 20, reached: make(chan struct{}), release: make(chan struct{})}
			go func() { slowDone <- downloadHeld(ep, slowBytes, 1<<20, 2*time.Hour, h) }()
			released := false
			defer func() {
				if !released {
					close(h.release)
				}
			}()
			select {
			case <-h.reached:
			case err := <-slowDone:
				t.Fatalf("slow client ended before its first MiB: %v", err)
			case <-time.After(2 * time.Minute):
				t.Fatal("slow client did not read its first MiB within 2 minutes")
			}
			start := time.Now()
			if err := download(ep, fastBytes, 0, 10*time.Minute); err != nil {
				t.Fatalf("fast client: %v", err)
			}
			el := time.Since(start)
			select {
			case err := <-slowDone:
				t.Fatalf("slow client ended while held (%v)", err)
			default:
			}
			close(h.release)
			released = true
			t.Logf("%s: fast client moved %d MiB in %v (%.2f Gbit/s) beside a 1 MB/s reader",
				mode, fastBytes>>20, el.Round(time.Millisecond), float64(fastBytes)*8/el.Seconds()/1e9)
			if err := <-slowDone; err != nil {
				t.Fatalf("slow client: %v", err)
			}
			_, gPeak := gwp.memKiB()
			_, aPeak := agp.memKiB()
			t.Logf("%s: peak RSS gateway %.1f MiB, agent %.1f MiB", mode, float64(gPeak)/1024, float64(aPeak)/1024)
			if gPeak > 64<<10 || aPeak > 64<<10 {
				t.Errorf("peak RSS over 64 MiB: gateway %d KiB, agent %d KiB", gPeak, aPeak)
			}
		})
	}
}

// waitProcEndpoint polls the gateway's admin API for a service's endpoint.
func waitProcEndpoint(t *testing.T, pg *procGateway, id string) string {
	t.Helper()
	var ep string
	testwait.For(t, 15*time.Second, "service "+id+" to be exposed", func() bool {
		ep = procEndpoint(pg, id)
		return ep != ""
	})
	return ep
}

func procEndpoint(pg *procGateway, id string) string {
	return procServiceEndpoint(pg, func(si adminapi.ServiceInfo) bool { return si.ID == id && si.Protocol == "tcp" })
}

func procUDPEndpoint(pg *procGateway) string {
	return procServiceEndpoint(pg, func(si adminapi.ServiceInfo) bool { return si.Protocol == "udp" })
}

// adminGet decodes the answer of the admin API at admin (host:port) for
// path into v, for polling: an error, never a test failure.
func adminGet(admin, path string, v any) error {
	req, _ := http.NewRequest(http.MethodGet, "http://"+admin+path, nil)
	req.Header.Set("Authorization", "Bearer "+adminToken)
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("admin %s: HTTP %d", path, resp.StatusCode)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// procServiceEndpoint asks a gateway process's admin API for the endpoint
// of the first service match accepts ("" if none or on error).
func procServiceEndpoint(pg *procGateway, match func(adminapi.ServiceInfo) bool) string {
	var services []adminapi.ServiceInfo
	if adminGet(pg.admin, adminapi.ServicesPath, &services) != nil {
		return ""
	}
	for _, si := range services {
		if match(si) {
			return si.Endpoint
		}
	}
	return ""
}

// The gateway is killed (SIGKILL) and started again: clients see a prompt
// close, and the agent is back, registered, on the same ports.
func TestGatewayCrash(t *testing.T) {
	echo := echoBackend(t)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			pg := newProcGateway(t, "1s")
			gwp := pg.start(t)
			startAgentProc(t, pg.url(), mode, "127.0.0.1:0", fmt.Sprintf("  - {name: echo, port: 7, backend: %q}\n  - {name: echo2, port: 8, backend: %q}\n", echo, echo), "")
			before := waitProcEndpoint(t, pg, "echo")
			before2 := waitProcEndpoint(t, pg, "echo2")
			c, err := net.Dial("tcp", before)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Write([]byte("x"))
			io.ReadFull(c, make([]byte, 1))

			gwp.kill()
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Read(make([]byte, 1)); isTimeout(err) {
				t.Fatal("client connection hung after the gateway died")
			}
			start := time.Now()
			pg.start(t)
			after := waitProcEndpoint(t, pg, "echo")
			back := time.Since(start)
			t.Logf("%s: agent registered %v after the gateway process started again", mode, back.Round(time.Millisecond))
			if after != before || procEndpoint(pg, "echo2") != before2 {
				t.Fatalf("ports moved: echo %s -> %s, echo2 %s -> %s", before, after, before2, procEndpoint(pg, "echo2"))
			}
			if err := testnet.EchoRoundTrip(after, []byte("after the crash")); err != nil {
				t.Fatal(err)
			}
			// Hang guard with room for a loaded machine; the figure above
			// is what docs/reliability.md reports.
			if back > 6*time.Second {
				t.Errorf("agent took %v to come back", back)
			}
		})
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// The agent is killed: the gateway closes its listeners (clients are
// refused, not left hanging); a restarted agent gets the same ports.
func TestAgentCrash(t *testing.T) {
	echo := echoBackend(t)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			pg := newProcGateway(t, "1s")
			pg.start(t)
			svc := fmt.Sprintf("  - {name: echo, port: 7, backend: %q}\n", echo)
			agp := startAgentProc(t, pg.url(), mode, "127.0.0.1:0", svc, "")
			before := waitProcEndpoint(t, pg, "echo")
			agp.kill()
			start := time.Now()
			testwait.For(t, 10*time.Second, "the public port to refuse", func() bool {
				c, err := net.DialTimeout("tcp", before, time.Second)
				if err == nil {
					c.Close()
				}
				return errors.Is(err, syscall.ECONNREFUSED)
			})
			t.Logf("%s: public port closed %v after the agent died", mode, time.Since(start).Round(time.Millisecond))
			startAgentProc(t, pg.url(), mode, "127.0.0.1:0", svc, "")
			after := waitProcEndpoint(t, pg, "echo")
			if after != before {
				t.Fatalf("port moved from %s to %s", before, after)
			}
			if err := testnet.EchoRoundTrip(after, []byte("agent is back")); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// gateProxy forwards TCP between the agent and the gateway and can stop
// forwarding without closing anything: a network partition without FIN.
type gateProxy struct {
	ln      net.Listener
	target  string
	mu      sync.Mutex
	blocked bool
	wake    chan struct{}
}

func newGateProxy(t *testing.T, target string) *gateProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &gateProxy{ln: ln, target: target, wake: make(chan struct{})}
	t.Cleanup(func() { ln.Close(); p.setBlocked(false) })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	return p
}

func (p *gateProxy) setBlocked(b bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.blocked && !b {
		close(p.wake)
		p.wake = make(chan struct{})
	}
	p.blocked = b
}

// gate blocks while the proxy is blocked.
func (p *gateProxy) gate() {
	for {
		p.mu.Lock()
		blocked, wake := p.blocked, p.wake
		p.mu.Unlock()
		if !blocked {
			return
		}
		<-wake
	}
}

func (p *gateProxy) serve(c net.Conn) {
	p.gate()
	up, err := net.Dial("tcp", p.target)
	if err != nil {
		c.Close()
		return
	}
	pump := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				p.gate() // hold the data, keep the connection open
				if _, werr := dst.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		dst.Close()
		src.Close()
	}
	go pump(up, c)
	pump(c, up)
}

// A partition that drops everything without a FIN is detected by both sides,
// and the tunnel recovers once the path is back. The detection time is
// logged; the bound itself (2.5-2.75 intervals) is asserted on a fake clock
// by internal/tunnel's TestHeartbeatDetectionBounds, so the wall clock here
// is only a hang guard.
func TestPartitionWithoutFIN(t *testing.T) {
	echo := echoBackend(t)
	for _, mode := range modes {
		t.Run(mode, func(t *testing.T) {
			pg := newProcGateway(t, "1s")
			gwp := pg.start(t)
			proxy := newGateProxy(t, pg.listen)
			metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
			startAgentProc(t, "ws://"+proxy.ln.Addr().String()+"/v1/tunnel", mode, metrics,
				fmt.Sprintf("  - {name: echo, port: 7, backend: %q}\n", echo), "")
			ep := waitProcEndpoint(t, pg, "echo")
			readyz := "http://" + metrics + "/readyz"

			proxy.setBlocked(true)
			start := time.Now()
			var gwSaw, agentSaw time.Duration
			testwait.For(t, 10*time.Second, "both sides to detect the partition", func() bool {
				if gwSaw == 0 && strings.Contains(gwp.logText(), "reason=heartbeat_timeout") {
					gwSaw = time.Since(start)
				}
				if agentSaw == 0 {
					if code, _ := httpGetQuiet(readyz); code == 503 {
						agentSaw = time.Since(start)
					}
				}
				return gwSaw > 0 && agentSaw > 0
			})
			t.Logf("%s: partition detected by the gateway after %v, by the agent after %v (heartbeat 1s)",
				mode, gwSaw.Round(time.Millisecond), agentSaw.Round(time.Millisecond))
			if c, err := net.DialTimeout("tcp", ep, time.Second); err == nil {
				c.Close()
				t.Error("public port still open while the agent is unreachable")
			}
			proxy.setBlocked(false)
			healed := time.Now()
			testwait.For(t, 30*time.Second, "the tunnel to recover", func() bool {
				code, _ := httpGetQuiet(readyz)
				return code == 200
			})
			t.Logf("%s: tunnel back %v after the path healed", mode, time.Since(healed).Round(time.Millisecond))
			if err := testnet.EchoRoundTrip(waitProcEndpoint(t, pg, "echo"), []byte("healed")); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// scrapeProc reads a process's go_goroutines and process_open_fds.
func scrapeProc(t *testing.T, url string) (goroutines, fds float64) {
	m := testmetrics.Scrape(t, url)
	return testmetrics.Sum(m, "go_goroutines", nil), testmetrics.Sum(m, "process_open_fds", nil)
}

// TestLoad runs many TCP connections and UDP sessions through one agent at
// once, each verifying its data, then checks that goroutines and file
// descriptors return to their baseline.
func TestLoad(t *testing.T) {
	conns := pick(300, 1000)
	sessions := pick(300, 1000)
	duration := pick(5*time.Second, 60*time.Second)
	tcpEcho, uEcho := echoBackend(t), udpEcho(t)
	pg := newProcGateway(t, "1s")
	pg.start(t)
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	startAgentProc(t, pg.url(), "yamux", metrics, fmt.Sprintf(
		"  - {name: echo, port: 7, backend: %q}\n  - {name: uecho, protocol: udp, port: 7, backend: %q}\n", tcpEcho, uEcho),
		"tunnels: {udp: {session_timeout: 2s}}")
	ep := waitProcEndpoint(t, pg, "echo")
	var uep string
	testwait.For(t, 5*time.Second, "the UDP endpoint", func() bool { uep = procUDPEndpoint(pg); return uep != "" })
	gwMetrics, agMetrics := "http://"+pg.admin+"/metrics", "http://"+metrics+"/metrics"
	gG0, gF0 := scrapeProc(t, gwMetrics)
	aG0, aF0 := scrapeProc(t, agMetrics)

	var errCount, tcpRounds, udpRounds, corrupt atomic.Int64
	var firstErr atomic.Value
	fail := func(err error) {
		errCount.Add(1)
		firstErr.CompareAndSwap(nil, err.Error())
	}
	stop := time.Now().Add(duration)
	var wg sync.WaitGroup
	for i := 0; i < conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", ep, 10*time.Second)
			if err != nil {
				fail(err)
				return
			}
			defer c.Close()
			msg := make([]byte, 1024)
			got := make([]byte, 1024)
			for time.Now().Before(stop) {
				rand.Read(msg)
				c.SetDeadline(time.Now().Add(20 * time.Second))
				if _, err := c.Write(msg); err != nil {
					fail(err)
					return
				}
				if _, err := io.ReadFull(c, got); err != nil {
					fail(err)
					return
				}
				if !bytes.Equal(msg, got) {
					corrupt.Add(1)
				}
				tcpRounds.Add(1)
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}
	for i := 0; i < sessions; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ua, _ := net.ResolveUDPAddr("udp", uep)
			c, err := net.DialUDP("udp", nil, ua)
			if err != nil {
				fail(err)
				return
			}
			defer c.Close()
			msg := make([]byte, 512)
			got := make([]byte, 2048)
			for time.Now().Before(stop) {
				rand.Read(msg)
				c.Write(msg)
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				n, err := c.Read(got)
				if err != nil {
					fail(fmt.Errorf("udp: %w", err))
					return
				}
				if !bytes.Equal(msg, got[:n]) {
					corrupt.Add(1)
				}
				udpRounds.Add(1)
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	t.Logf("%d TCP connections and %d UDP sessions for %v: %d TCP and %d UDP round trips, %d errors, %d corrupted",
		conns, sessions, duration, tcpRounds.Load(), udpRounds.Load(), errCount.Load(), corrupt.Load())
	if errCount.Load() != 0 || corrupt.Load() != 0 {
		gm, am := testmetrics.Scrape(t, gwMetrics), testmetrics.Scrape(t, agMetrics)
		t.Logf("gateway drops %v, refusals %v; agent drops %v, errors %v",
			testmetrics.Sum(gm, "portway_gateway_udp_dropped_total", nil), testmetrics.Sum(gm, "portway_gateway_refusals_total", nil),
			testmetrics.Sum(am, "portway_agent_udp_tunnel_dropped_total", nil), testmetrics.Sum(am, "pipeops_agent_tcp_tunnel_errors_total", nil))
		t.Fatalf("%d errors (first: %v), %d corrupted messages", errCount.Load(), firstErr.Load(), corrupt.Load())
	}
	// Everything closed and UDP sessions timed out: back to baseline.
	var gG, gF, aG, aF float64
	testwait.For(t, 20*time.Second, "goroutines and file descriptors to return to baseline", func() bool {
		gG, gF = scrapeProc(t, gwMetrics)
		aG, aF = scrapeProc(t, agMetrics)
		return gG <= gG0+2 && gF <= gF0+1 && aG <= aG0+2 && aF <= aF0+1
	})
	t.Logf("gateway goroutines %v -> %v, fds %v -> %v; agent goroutines %v -> %v, fds %v -> %v", gG0, gG, gF0, gF, aG0, aG, aF0, aF)
}

package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// countingConn counts the writes that reach the socket.
type countingConn struct {
	net.Conn
	writes *atomic.Int64
}

func (c countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

type countingListener struct {
	net.Listener
	writes *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return countingConn{c, l.writes}, nil
}

// tlsWSPair connects a WebSocket over TLS on loopback as the gateway and
// the agent do: CorkListener under the gateway's TLS, Dial with wss on the
// agent. It returns both ends as wsConns and counters of the writes each
// side makes to its socket.
func tlsWSPair(t testing.TB) (gw, ag *wsConn, gwWrites, agWrites *atomic.Int64) {
	return wsPair(t, true)
}

// wsPair is tlsWSPair, or the same over plain TCP (ws://) without useTLS.
func wsPair(t testing.TB, useTLS bool) (gw, ag *wsConn, gwWrites, agWrites *atomic.Int64) {
	t.Helper()
	gwWrites, agWrites = new(atomic.Int64), new(atomic.Int64)
	wsCh := make(chan *websocket.Conn, 1)
	up := NewUpgrader(5 * time.Second)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := up.Upgrade(w, r, nil)
		if err != nil {
			t.Errorf("upgrade: %v", err)
			return
		}
		wsCh <- ws
	}))
	var tlsConf *tls.Config
	if useTLS {
		srv.Listener = CorkListener(countingListener{srv.Listener, gwWrites})
		srv.StartTLS()
		roots := x509.NewCertPool()
		roots.AddCert(srv.Certificate())
		tlsConf = &tls.Config{RootCAs: roots}
	} else {
		srv.Listener = countingListener{srv.Listener, gwWrites}
		srv.Start()
	}
	t.Cleanup(srv.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	url := "ws" + strings.TrimPrefix(strings.TrimPrefix(srv.URL, "http"), "s") + Path
	if useTLS {
		url = "wss" + strings.TrimPrefix(srv.URL, "https") + Path
	}
	ws, err := Dial(ctx, url, DialOptions{
		TLS: tlsConf,
		NetDial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return countingConn{c, agWrites}, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	var sws *websocket.Conn
	select {
	case sws = <-wsCh:
	case <-ctx.Done():
		t.Fatal("no upgrade")
	}
	gw = newWSConn(sws, 1<<20, 5*time.Second, wallClock{})
	ag = newWSConn(ws, 1<<20, 5*time.Second, wallClock{})
	t.Cleanup(func() { gw.fail(nil); ag.fail(nil) })
	if useTLS && (gw.cork == nil || ag.cork == nil) {
		t.Fatalf("no corkConn found under TLS: gateway %v, agent %v", gw.cork != nil, ag.cork != nil)
	}
	return gw, ag, gwWrites, agWrites
}

// TestTLSMessageLeavesInOneWrite checks that a 64 KiB message, which TLS
// sends as five records, reaches the socket in one write on either side,
// and arrives intact.
func TestTLSMessageLeavesInOneWrite(t *testing.T) {
	gw, ag, gwWrites, agWrites := tlsWSPair(t)
	msg := make([]byte, 64<<10)
	rand.Read(msg)
	for _, side := range []struct {
		name     string
		from, to *wsConn
		writes   *atomic.Int64
	}{{"gateway", gw, ag, gwWrites}, {"agent", ag, gw, agWrites}} {
		before := side.writes.Load()
		if err := side.from.writeDirect(websocket.BinaryMessage, msg); err != nil {
			t.Fatalf("%s: write: %v", side.name, err)
		}
		if n := side.writes.Load() - before; n != 1 {
			t.Errorf("%s: a 64 KiB message took %d socket writes, want 1", side.name, n)
		}
		side.to.ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		typ, got, err := side.to.ws.ReadMessage()
		if err != nil {
			t.Fatalf("%s: read: %v", side.name, err)
		}
		if typ != websocket.BinaryMessage || !bytes.Equal(got, msg) {
			t.Errorf("%s: message arrived changed (type %d, %d bytes)", side.name, typ, len(got))
		}
	}
}

// TestTLSConcurrentWritersKeepOrder has yamux's direct writes and the
// writer goroutine's queued control messages race on one TLS connection:
// every message must arrive whole and in each writer's order (a record
// written out of order would fail TLS's integrity check).
func TestTLSConcurrentWritersKeepOrder(t *testing.T) {
	gw, ag, _, _ := tlsWSPair(t)
	const n = 200
	var wg sync.WaitGroup
	wg.Go(func() {
		big := make([]byte, 40<<10)
		for i := range n {
			big[0] = byte(i)
			if err := gw.writeDirect(websocket.BinaryMessage, big); err != nil {
				if !t.Failed() {
					t.Errorf("direct write %d: %v", i, err)
				}
				return
			}
		}
	})
	wg.Go(func() {
		for i := range n {
			if err := gw.queueControlText([]byte{byte(i)}); err != nil {
				if !t.Failed() {
					t.Errorf("queued write %d: %v", i, err)
				}
				return
			}
		}
	})
	var nextBin, nextText int
	ag.ws.SetReadDeadline(time.Now().Add(30 * time.Second))
	for nextBin < n || nextText < n {
		typ, b, err := ag.ws.ReadMessage()
		if err != nil {
			t.Errorf("read after %d binary and %d text messages: %v", nextBin, nextText, err)
			break
		}
		switch {
		case typ == websocket.BinaryMessage && len(b) == 40<<10 && b[0] == byte(nextBin):
			nextBin++
		case typ == websocket.TextMessage && len(b) == 1 && b[0] == byte(nextText):
			nextText++
		default:
			t.Errorf("unexpected message: type %d, %d bytes, first %d (expecting binary %d, text %d)", typ, len(b), b[0], nextBin, nextText)
		}
		if t.Failed() {
			break
		}
	}
	if t.Failed() {
		gw.fail(nil) // end the writers
	}
	wg.Wait()
}

// TestControlQueuedBeforeDirectWriteGoesFirst: a control message queued
// before a direct write (the handshake's acknowledgement before yamux's
// first frame) reaches the peer first, although the writer goroutine
// writes one and the caller the other.
func TestControlQueuedBeforeDirectWriteGoesFirst(t *testing.T) {
	gw, ag, _, _ := tlsWSPair(t)
	const rounds = 300
	errc := make(chan error, 1)
	go func() {
		for i := range rounds {
			if err := gw.queueControlText([]byte{byte(i)}); err != nil {
				errc <- err
				return
			}
			if err := gw.writeDirect(websocket.BinaryMessage, []byte{byte(i)}); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	ag.ws.SetReadDeadline(time.Now().Add(30 * time.Second))
	for i := range rounds {
		for _, want := range []int{websocket.TextMessage, websocket.BinaryMessage} {
			typ, b, err := ag.ws.ReadMessage()
			if err != nil {
				t.Fatalf("round %d: read: %v", i, err)
			}
			if typ != want || len(b) != 1 || b[0] != byte(i) {
				gw.fail(nil)
				t.Fatalf("round %d: got message type %d %v, want type %d [%d]", i, typ, b, want, i)
			}
		}
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// BenchmarkWSMessage writes 32 KiB binary messages (a yamux frame of the
// default 32 KiB copy buffer) the way yamux's send loop does, from the
// gateway and from the agent, over ws and over wss, while the peer reads
// and discards them; MB/s is the message rate.
func BenchmarkWSMessage(b *testing.B) {
	for _, mode := range []string{"ws", "wss"} {
		for _, from := range []string{"gateway", "agent"} {
			b.Run(mode+"/"+from, func(b *testing.B) {
				gw, ag, _, _ := wsPair(b, mode == "wss")
				w, r := gw, ag
				if from == "agent" {
					w, r = ag, gw
				}
				done := make(chan struct{})
				go func() {
					defer close(done)
					for {
						_, rd, err := r.ws.NextReader()
						if err != nil {
							return
						}
						if _, err := io.Copy(io.Discard, rd); err != nil {
							return
						}
					}
				}()
				msg := make([]byte, 32<<10)
				b.SetBytes(int64(len(msg)))
				b.ReportAllocs()
				for b.Loop() {
					if err := w.writeDirect(websocket.BinaryMessage, msg); err != nil {
						b.Fatal(err)
					}
				}
				w.fail(nil)
				<-done
			})
		}
	}
}

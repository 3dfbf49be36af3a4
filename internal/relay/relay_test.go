package relay

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t testing.TB) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	c1, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c2 := <-ch
	t.Cleanup(func() { c1.Close(); c2.Close() })
	return c1.(*net.TCPConn), c2.(*net.TCPConn)
}

// relayed sets up client <-> [a | relay | b] <-> server, a being the
// relay's client side and b its backend side, and returns the outer ends
// and a channel with the relay's result.
func relayed(t testing.TB, opt Options, st *Stats) (client, server *net.TCPConn, done chan Result) {
	client, a := tcpPair(t)
	b, server := tcpPair(t)
	done = make(chan Result, 1)
	go func() { done <- Pipe(a, b, opt, st) }()
	return client, server, done
}

func TestPipeCopiesAndCounts(t *testing.T) {
	var st Stats
	client, server, done := relayed(t, Options{BufferSize: 4096}, &st)
	up := make([]byte, 3<<20)
	down := make([]byte, 1<<20)
	rand.Read(up)
	rand.Read(down)
	go func() {
		client.Write(up)
		client.CloseWrite()
	}()
	go func() {
		server.Write(down)
		server.CloseWrite()
	}()
	gotUp, err := io.ReadAll(server)
	if err != nil || !bytes.Equal(gotUp, up) {
		t.Fatalf("server got %d bytes (%v), want %d", len(gotUp), err, len(up))
	}
	gotDown, err := io.ReadAll(client)
	if err != nil || !bytes.Equal(gotDown, down) {
		t.Fatalf("client got %d bytes (%v), want %d", len(gotDown), err, len(down))
	}
	res := <-done
	if res.Err != nil {
		t.Fatalf("relay ended with %v", res.Err)
	}
	if st.ToBackend.Load() != int64(len(up)) || st.FromBackend.Load() != int64(len(down)) {
		t.Fatalf("counted %d/%d bytes, want %d/%d", st.ToBackend.Load(), st.FromBackend.Load(), len(up), len(down))
	}
}

// The client half-closes, and the server still answers after seeing EOF.
func TestPipeHalfClose(t *testing.T) {
	client, server, done := relayed(t, Options{}, nil)
	client.Write([]byte("request"))
	client.CloseWrite()
	req, err := io.ReadAll(server)
	if err != nil || string(req) != "request" {
		t.Fatalf("server read %q, %v", req, err)
	}
	server.Write([]byte("reply after EOF"))
	server.Close()
	reply, err := io.ReadAll(client)
	if err != nil || string(reply) != "reply after EOF" {
		t.Fatalf("client read %q, %v", reply, err)
	}
	if res := <-done; res.Err != nil {
		t.Fatalf("relay ended with %v", res.Err)
	}
}

// The idle timeout counts traffic in either direction: a phase of traffic
// one way only, then one the other way only, each lasting well beyond the
// timeout, keeps the connection; then silence closes it. The ratios are wide
// (a byte every 1/20 of the timeout; each phase at least 2.5 timeouts long
// on the wall clock), so a busy machine cannot make a correct build fail,
// and a build that forgets either direction is cut during its phase.
func TestPipeIdleTimeoutCountsBothDirections(t *testing.T) {
	const idle = time.Second
	client, server, done := relayed(t, Options{IdleTimeout: idle}, nil)
	phase := func(name string, from, to *net.TCPConn) {
		t.Helper()
		start := time.Now()
		buf := make([]byte, 1)
		for i := 0; time.Since(start) < idle*5/2; i++ {
			if i > 1000 {
				t.Fatalf("%s: phase did not end", name)
			}
			if _, err := from.Write([]byte("x")); err != nil {
				t.Fatalf("%s: write %d: %v", name, i, err)
			}
			to.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadFull(to, buf); err != nil {
				t.Fatalf("%s: byte %d not relayed after %v: %v", name, i, time.Since(start), err)
			}
			select {
			case res := <-done:
				t.Fatalf("%s: relay ended after %v of traffic in this direction only: %+v", name, time.Since(start), res)
			default:
			}
			time.Sleep(idle / 20)
		}
	}
	phase("client to backend", client, server)
	phase("backend to client", server, client)
	// Then silence: the relay closes both sides.
	select {
	case res := <-done:
		if !errors.Is(res.Err, ErrIdle) {
			t.Fatalf("result %+v, want idle timeout", res)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("idle connection not closed")
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := client.Read(make([]byte, 1)); err == nil {
		t.Fatal("client still connected after idle timeout")
	}
}

func TestPipeAbortPropagatesReset(t *testing.T) {
	client, server, done := relayed(t, Options{}, nil)
	server.SetLinger(0)
	server.Close() // RST towards the relay
	if res := <-done; res.Err == nil {
		t.Fatal("relay saw no error from a reset connection")
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := client.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read err = %v, want a connection reset", err)
	}
}

func TestWaitReadableDoesNotConsume(t *testing.T) {
	a, b := tcpPair(t)
	go func() {
		time.Sleep(50 * time.Millisecond)
		a.Write([]byte("hi"))
	}()
	if err := WaitReadable(b); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2)
	if _, err := io.ReadFull(b, buf); err != nil || string(buf) != "hi" {
		t.Fatalf("read %q, %v", buf, err)
	}
}

func BenchmarkPipe(b *testing.B) {
	client, server, done := relayed(b, Options{}, nil)
	defer func() { client.Close(); server.Close(); <-done }()
	buf := make([]byte, 32<<10)
	go io.Copy(io.Discard, server)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := client.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
}

package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// tcpServer accepts connections on 127.0.0.1 and runs a handler for each.
// It counts open connections, so a measurement can wait until those of the
// previous one are gone, and Close ends every connection and waits for the
// handlers.
type tcpServer struct {
	ln     net.Listener
	handle func(ctx context.Context, c *net.TCPConn)
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	active atomic.Int64

	mu     sync.Mutex
	conns  map[*net.TCPConn]struct{}
	closed bool
}

// listenTCP starts a server on a free loopback port. handle's ctx ends when
// the server closes; the server closes the connection when handle returns.
func listenTCP(handle func(ctx context.Context, c *net.TCPConn)) (*tcpServer, error) {
	return listenTCPOn("127.0.0.1:0", handle)
}

// listenTCPOn is listenTCP on a given address.
func listenTCPOn(addr string, handle func(ctx context.Context, c *net.TCPConn)) (*tcpServer, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &tcpServer{ln: ln, handle: handle, ctx: ctx, cancel: cancel, conns: map[*net.TCPConn]struct{}{}}
	s.wg.Add(1)
	go s.acceptLoop()
	return s, nil
}

// Addr returns host:port.
func (s *tcpServer) Addr() string { return s.ln.Addr().String() }

func (s *tcpServer) acceptLoop() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors, most likely: back off instead of
			// spinning; the measurement sees the stall as an error.
			select {
			case <-s.ctx.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		tc := c.(*net.TCPConn)
		if !s.track(tc) {
			tc.Close()
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.untrack(tc)
			s.handle(s.ctx, tc)
		}()
	}
}

func (s *tcpServer) track(c *net.TCPConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	s.active.Add(1)
	return true
}

func (s *tcpServer) untrack(c *net.TCPConn) {
	c.Close()
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.active.Add(-1)
}

// waitIdle waits until no connection is open, at most timeout, so that
// bytes still in flight from one measurement do not count in the next.
func (s *tcpServer) waitIdle(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for s.active.Load() > 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("%d connections to %s still open %v after the clients closed theirs", s.active.Load(), s.Addr(), timeout)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(5 * time.Millisecond):
		}
	}
	return nil
}

// Close stops accepting, closes every connection and waits for the
// handlers to return.
func (s *tcpServer) Close() {
	s.mu.Lock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.cancel()
	s.ln.Close()
	s.wg.Wait()
}

// sink is the throughput backend: it reads and discards, counting bytes.
type sink struct {
	*tcpServer
	received atomic.Int64
}

// sinkBuffer is large so the sink is never what limits throughput.
const sinkBuffer = 256 << 10

func startSink() (*sink, error) {
	s := &sink{}
	srv, err := listenTCP(func(_ context.Context, c *net.TCPConn) {
		buf := make([]byte, sinkBuffer)
		for {
			n, err := c.Read(buf)
			s.received.Add(int64(n))
			if err != nil {
				return
			}
		}
	})
	if err != nil {
		return nil, fmt.Errorf("sink: %w", err)
	}
	s.tcpServer = srv
	return s, nil
}

// echoBuffer is small: the echo server carries 1-byte messages, and holds
// thousands of idle connections in the memory-at-scale case.
const echoBuffer = 512

// startEcho starts the round-trip backend on a free loopback port: it
// echoes every byte and, after the client's FIN, closes its side.
func startEcho() (*tcpServer, error) { return startEchoOn("127.0.0.1:0") }

// startEchoOn is startEcho on a given address.
func startEchoOn(addr string) (*tcpServer, error) {
	srv, err := listenTCPOn(addr, func(_ context.Context, c *net.TCPConn) {
		buf := make([]byte, echoBuffer)
		if _, err := io.CopyBuffer(writerOnly{c}, readerOnly{c}, buf); err == nil {
			c.CloseWrite()
		}
	})
	if err != nil {
		return nil, fmt.Errorf("echo: %w", err)
	}
	return srv, nil
}

// readerOnly and writerOnly hide ReadFrom and WriteTo, so io.CopyBuffer
// copies through its buffer in user space rather than splicing in the
// kernel.
type readerOnly struct{ io.Reader }

type writerOnly struct{ io.Writer }

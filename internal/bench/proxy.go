package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"
)

// dialTimeout bounds every dial the bench makes on loopback.
const dialTimeout = 5 * time.Second

// relayBuffer is the reference relay's copy buffer per direction: the size
// of portway's default buffer_size, so the comparison is like for like.
const relayBuffer = 32 << 10

// startRelay starts the bench's reference for one userspace hop: a plain
// TCP relay that accepts, dials target and copies both ways, passing each
// half-close on. It copies through a buffer in user space, as any hop that
// looks at or frames the bytes must; io.Copy between two TCP connections
// would splice in the kernel instead and measure something a tunnel can
// never do.
func startRelay(target string) (*tcpServer, error) {
	return startRelayOn("127.0.0.1:0", target)
}

// startRelayOn is startRelay listening on addr.
func startRelayOn(addr, target string) (*tcpServer, error) {
	return listenTCPOn(addr, func(ctx context.Context, c *net.TCPConn) {
		d := net.Dialer{Timeout: dialTimeout}
		bc, err := d.DialContext(ctx, "tcp", target)
		if err != nil {
			return
		}
		b := bc.(*net.TCPConn)
		defer b.Close()
		var wg sync.WaitGroup
		wg.Go(func() { relayHalf(b, c) })
		relayHalf(c, b)
		wg.Wait()
	})
}

// relayHalf copies src to dst and passes EOF on as a half-close; an error
// closes both so the other direction ends too.
func relayHalf(dst, src *net.TCPConn) {
	buf := make([]byte, relayBuffer)
	if _, err := io.CopyBuffer(writerOnly{dst}, readerOnly{src}, buf); err != nil {
		src.Close()
		dst.Close()
		return
	}
	dst.CloseWrite()
}

// Delay stage limits: each direction of a connection holds at most
// delayChunks reads of up to delayChunk bytes (64 MiB), allocated as
// needed. At 10 ms that is room for 50 Gbit/s of full reads, so the stage
// adds latency without limiting bandwidth.
const (
	delayChunk  = 64 << 10
	delayChunks = 1024
)

// startDelay starts a TCP proxy to target that holds every chunk it reads
// for delay before writing it on, in each direction, preserving order: a
// link with 2×delay of round-trip time and no bandwidth limit of its own.
func startDelay(target string, delay time.Duration) (*tcpServer, error) {
	return listenTCP(func(ctx context.Context, c *net.TCPConn) {
		d := net.Dialer{Timeout: dialTimeout}
		bc, err := d.DialContext(ctx, "tcp", target)
		if err != nil {
			return
		}
		b := bc.(*net.TCPConn)
		defer b.Close()
		done := make(chan struct{})
		var once sync.Once
		abort := func() {
			once.Do(func() {
				close(done)
				c.Close()
				b.Close()
			})
		}
		stop := context.AfterFunc(ctx, abort)
		defer stop()
		var wg sync.WaitGroup
		for _, dir := range [][2]*net.TCPConn{{c, b}, {b, c}} {
			l := newDelayLine(delay)
			wg.Go(func() { l.read(dir[0], done) })
			wg.Go(func() { l.write(dir[1], done, abort) })
		}
		wg.Wait()
	})
}

// delayLine is one direction of the delay stage. The reader timestamps each
// chunk and queues it; the writer writes it when due. Buffers circulate
// between the two through free, which bounds the memory.
type delayLine struct {
	delay     time.Duration
	queue     chan delayed // room for every buffer plus the final marker
	free      chan *[]byte
	allocated int // buffers made so far; touched by the reader only
}

// delayed is a chunk, or (buf nil) the end of the stream: err is io.EOF
// for a clean end, anything else for a failure.
type delayed struct {
	buf *[]byte
	n   int
	due time.Time
	err error
}

func newDelayLine(delay time.Duration) *delayLine {
	return &delayLine{
		delay: delay,
		queue: make(chan delayed, delayChunks+1),
		free:  make(chan *[]byte, delayChunks),
	}
}

// buffer returns a free buffer, allocating until delayChunks exist, then
// waiting for the writer to return one.
func (l *delayLine) buffer(done <-chan struct{}) (*[]byte, bool) {
	select {
	case b := <-l.free:
		return b, true
	default:
	}
	if l.allocated < delayChunks {
		l.allocated++
		b := make([]byte, delayChunk)
		return &b, true
	}
	select {
	case b := <-l.free:
		return b, true
	case <-done:
		return nil, false
	}
}

func (l *delayLine) read(src *net.TCPConn, done <-chan struct{}) {
	for {
		buf, ok := l.buffer(done)
		if !ok {
			return
		}
		n, err := src.Read(*buf)
		due := time.Now().Add(l.delay)
		if n > 0 {
			l.queue <- delayed{buf: buf, n: n, due: due} // never blocks: one slot per buffer
		} else {
			l.free <- buf
		}
		if err != nil {
			l.queue <- delayed{due: due, err: err}
			return
		}
	}
}

func (l *delayLine) write(dst *net.TCPConn, done <-chan struct{}, abort func()) {
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	for {
		var d delayed
		select {
		case d = <-l.queue:
		case <-done:
			return
		}
		if wait := time.Until(d.due); wait > 0 {
			t.Reset(wait)
			select {
			case <-t.C:
			case <-done:
				return
			}
		}
		if d.buf == nil {
			if errors.Is(d.err, io.EOF) {
				dst.CloseWrite()
			} else {
				abort()
			}
			return
		}
		_, err := dst.Write((*d.buf)[:d.n])
		l.free <- d.buf // never blocks: one slot per buffer
		if err != nil {
			abort()
			return
		}
	}
}

// ServeRelays runs the reference relay in this process, one listener per
// pair ("listen=target"), until ctx ends. It is the child process of the
// relay-process path (`portway bench-relay`).
func ServeRelays(ctx context.Context, pairs []string) error {
	var servers []*tcpServer
	defer func() {
		for _, s := range servers {
			s.Close()
		}
	}()
	for _, pr := range pairs {
		listen, target, ok := strings.Cut(pr, "=")
		if !ok {
			return fmt.Errorf("bench-relay: %q is not LISTEN=TARGET", pr)
		}
		s, err := startRelayOn(listen, target)
		if err != nil {
			return fmt.Errorf("bench-relay: %w", err)
		}
		servers = append(servers, s)
	}
	<-ctx.Done()
	return nil
}

// startRelayProcess runs the reference relay as a child process in front
// of sink and echo, and waits until both listeners accept.
func startRelayProcess(ctx context.Context, ex Exec, dir, name, sink, echo string, onExit func(*child)) (*child, target, error) {
	ports, err := freePorts(2)
	if err != nil {
		return nil, target{}, err
	}
	c, err := startChild(ex, dir, name, []string{"bench-relay", ports[0] + "=" + sink, ports[1] + "=" + echo}, onExit)
	if err != nil {
		return nil, target{}, err
	}
	if err := waitListening(ctx, c, ports...); err != nil {
		return nil, target{}, err
	}
	return c, target{sink: ports[0], echo: ports[1]}, nil
}

// ServeEcho runs the bench's echo backend on listen until ctx ends. It is
// the child process that holds the backend side of the idle connections
// (`portway bench-echo`), so that the bench process needs one descriptor
// per idle connection, not two.
func ServeEcho(ctx context.Context, listen string) error {
	s, err := startEchoOn(listen)
	if err != nil {
		return fmt.Errorf("bench-echo: %w", err)
	}
	<-ctx.Done()
	s.Close()
	return nil
}

// startEchoProcess runs the echo backend as a child process and waits until
// it accepts; it returns the child and its address.
func startEchoProcess(ctx context.Context, ex Exec, dir, name string, onExit func(*child)) (*child, string, error) {
	ports, err := freePorts(1)
	if err != nil {
		return nil, "", err
	}
	c, err := startChild(ex, dir, name, []string{"bench-echo", ports[0]}, onExit)
	if err != nil {
		return nil, "", err
	}
	if err := waitListening(ctx, c, ports[0]); err != nil {
		return nil, "", err
	}
	return c, ports[0], nil
}

// waitListening waits until a child accepts connections on every address,
// and stops it if it does not within startupTimeout.
func waitListening(ctx context.Context, c *child, addrs ...string) error {
	deadline := time.Now().Add(startupTimeout)
	for _, addr := range addrs {
		for {
			conn, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				conn.Close()
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				c.stop()
				return fmt.Errorf("%s not listening on %s: %w", c.name, addr, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

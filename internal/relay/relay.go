// Package relay copies data between two connections: a public client or a
// backend on one side, a tunnel stream on the other. It is written once and
// shared by gateway and agent: pooled buffers held only while data flows,
// byte counting, half-close carried in both directions, and an idle timeout
// counted on traffic in either direction.
//
// Directions are named by role, the same on the gateway and the agent. A
// TCP relay joins a client side (the public connection on the gateway, the
// tunnel stream on the agent) to a backend side (the tunnel stream on the
// gateway, the backend connection on the agent), and counts bytes going to
// the backend and coming from it. A UDP relay joins the tunnel to a socket
// (one public client on the gateway, the backend socket on the agent), and
// counts datagrams going into the tunnel and coming out of it.
package relay

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/portway/portway/internal/pool"
)

// Conn is one side of a relayed TCP connection: a *net.TCPConn or a tunnel
// stream.
type Conn interface {
	io.Reader
	io.Writer
	// CloseWrite sends a FIN (or its tunnel equivalent).
	CloseWrite() error
	Close() error
}

// Stats counts one relayed connection. The fields are updated as data
// flows, so a metrics collector may read them while the relay runs.
type Stats struct {
	// ToBackend counts bytes copied from the client side to the backend
	// side (what the client sent); FromBackend the other way.
	ToBackend, FromBackend atomic.Int64
	// lastActive is the monotonic time of the last read, in nanoseconds
	// since the process' relay epoch.
	lastActive atomic.Int64
}

// Result says how a relay ended.
type Result struct {
	// Err is the first error that aborted the connection or session: nil
	// when both directions ended with a clean EOF (or, for UDP, a close),
	// ErrIdle when the idle timeout ended it.
	Err error
	// TooLarge and QueueFull count the datagrams a UDP session dropped:
	// larger than PacketOptions.MaxDatagram (either way), and arrived
	// from the tunnel while its receive queue was full (JSON mode, see
	// DropCounter). Both are 0 for a TCP connection.
	TooLarge, QueueFull int64
}

// ErrIdle is Result.Err when the idle timeout ended the connection.
var ErrIdle = errors.New("relay: idle timeout")

// Options tune a relay.
type Options struct {
	// BufferSize is the copy buffer per direction (tcp.buffer_size).
	BufferSize int
	// IdleTimeout closes the connection after this long without a byte in
	// either direction; 0 disables it.
	IdleTimeout time.Duration
}

var epoch = time.Now()

func monotonic() int64 { return int64(time.Since(epoch)) }

// Pipe copies client→backend and backend→client until both directions
// have ended, then closes both. client is the side toward the public
// client, backend the side toward the backend (see the package comment).
// An EOF on one side is passed on as a half-close of the other; an error
// on either side aborts both. Pipe returns when both copies are done.
func Pipe(client, backend Conn, opt Options, st *Stats) Result {
	ch := make(chan Result, 1)
	Start(client, backend, opt, st, func(r Result) { ch <- r })
	return <-ch
}

// Start is Pipe without the wait: it copies in two new goroutines, one per
// direction, and calls done with the result once both have ended and the
// connections are closed. The caller's goroutine is free to return, so a
// long-lived connection holds only the two copy goroutines, whose stacks
// stay small, rather than also the deeper stack that set it up.
func Start(client, backend Conn, opt Options, st *Stats, done func(Result)) {
	if opt.BufferSize <= 0 {
		opt.BufferSize = 32 << 10
	}
	if st == nil {
		st = new(Stats)
	}
	st.lastActive.Store(monotonic())
	p := &pipe{a: client, b: backend}
	stopIdle := watchIdle(opt.IdleTimeout, &st.lastActive, func() { p.abort(ErrIdle) })
	var running atomic.Int32
	running.Store(2)
	finish := func() {
		if running.Add(-1) != 0 {
			return
		}
		stopIdle()
		p.closeBoth()
		done(Result{Err: p.firstErr()})
	}
	go func() {
		p.half(backend, client, &st.FromBackend, &st.lastActive, opt.BufferSize)
		finish()
	}()
	go func() {
		p.half(client, backend, &st.ToBackend, &st.lastActive, opt.BufferSize)
		finish()
	}()
}

// watchIdle calls onIdle once nothing was recorded in last for d, checking
// only when the timer fires (no per-read timer reset). d <= 0 disables it.
// The returned stop must be called when the connection ends.
func watchIdle(d time.Duration, last *atomic.Int64, onIdle func()) (stop func()) {
	if d <= 0 {
		return func() {}
	}
	w := &idleWatch{d: d, last: last, onIdle: onIdle}
	w.mu.Lock()
	w.t = time.AfterFunc(d, w.check)
	w.mu.Unlock()
	return func() {
		w.mu.Lock()
		w.stopped = true
		w.t.Stop()
		w.mu.Unlock()
	}
}

type idleWatch struct {
	d       time.Duration
	last    *atomic.Int64
	onIdle  func()
	mu      sync.Mutex
	t       *time.Timer
	stopped bool
}

func (w *idleWatch) check() {
	since := time.Duration(monotonic() - w.last.Load())
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return
	}
	if since < w.d {
		w.t.Reset(w.d - since)
		return
	}
	w.stopped = true
	go w.onIdle() // onIdle closes connections; never under w.mu
}

type pipe struct {
	a, b    Conn
	mu      sync.Mutex
	err     error
	aborted bool
}

// half copies src to dst, then half-closes dst at EOF or aborts both on error.
func (p *pipe) half(src, dst Conn, n, active *atomic.Int64, size int) {
	err := copyCounting(dst, src, n, active, size)
	if err != nil {
		p.abort(err)
		return
	}
	if err := dst.CloseWrite(); err != nil && !isClosed(err) {
		p.abort(err)
	}
}

func (p *pipe) abort(err error) {
	p.mu.Lock()
	if p.err == nil {
		p.err = err
	}
	already := p.aborted
	p.aborted = true
	p.mu.Unlock()
	if !already {
		Abort(p.a)
		Abort(p.b)
	}
}

func (p *pipe) firstErr() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

func (p *pipe) closeBoth() {
	p.mu.Lock()
	aborted := p.aborted
	p.mu.Unlock()
	if !aborted {
		p.a.Close()
		p.b.Close()
	}
}

// Abort closes c abruptly: a tunnel stream is reset, a TCP connection is
// closed with an RST, so the peer sees a failure rather than a clean end.
func Abort(c io.Closer) {
	switch c := c.(type) {
	case interface{ Reset() error }:
		c.Reset()
	case *net.TCPConn:
		c.SetLinger(0)
		c.Close()
	default:
		c.Close()
	}
}

// smallRead is what a socket is read with while no data is in flight: big
// enough for a typical request or reply in one read, small enough that idle
// connections cost little.
const smallRead = 512

// copyCounting copies until EOF (returning nil) or an error. It holds a
// full-size buffer only while data flows. A socket with nothing in flight
// is read with a small buffer of its own; a read that fills it means more
// is coming, and the copy switches to a pooled buffer until the socket
// drains (a short read). A tunnel stream is first waited on with no buffer
// at all (WaitReadable costs no system call there).
func copyCounting(dst io.Writer, src io.Reader, n, active *atomic.Int64, size int) error {
	_, isStream := src.(interface{ WaitReadable() error })
	var small []byte
	var big *[]byte
	defer func() {
		if big != nil {
			pool.Put(big)
		}
	}()
	for {
		var b []byte
		switch {
		case big != nil:
			b = *big
		case isStream:
			if err := WaitReadable(src); err == io.EOF {
				return nil
			} else if err != nil {
				return err
			}
			big = pool.Get(size)
			b = *big
		default:
			if small == nil {
				small = make([]byte, min(smallRead, size))
			}
			b = small
		}
		nr, rerr := src.Read(b)
		if nr > 0 {
			active.Store(monotonic())
			nw, werr := dst.Write(b[:nr])
			n.Add(int64(nw))
			if werr != nil {
				return werr
			}
			if nw != nr {
				return io.ErrShortWrite
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
		switch {
		case big != nil && nr < len(b):
			// Drained for now: the next read may block; don't hold the
			// big buffer through it.
			pool.Put(big)
			big = nil
		case big == nil && !isStream && nr == len(b):
			big = pool.Get(size) // a burst: read the rest in big chunks
		}
	}
}

// WaitReadable blocks until a read from r would not block, for the sources
// that can say so without consuming data: sockets (by peeking) and tunnel
// streams. For anything else it returns at once.
func WaitReadable(r any) error {
	switch r := r.(type) {
	case interface{ WaitReadable() error }:
		return r.WaitReadable()
	case syscall.Conn:
		rc, err := r.SyscallConn()
		if err != nil {
			return err
		}
		var p peeker
		if err := rc.Read(p.peek); err != nil {
			return err
		}
		return p.err
	}
	return nil
}

// peeker waits for readability by peeking one byte without consuming it.
type peeker struct {
	b   [1]byte
	err error
}

func (p *peeker) peek(fd uintptr) bool {
	e := peekByte(fd, &p.b[0])
	switch e {
	case 0:
	case syscall.EAGAIN:
		return false // not readable yet: park until the poller says so
	case syscall.EINTR:
		return false
	default:
		p.err = e
	}
	return true
}

func isClosed(err error) bool {
	return errors.Is(err, net.ErrClosed)
}

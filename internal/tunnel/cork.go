package tunnel

import (
	"net"
	"sync"

	"github.com/portway/portway/internal/pool"
)

// corkConn is the TCP connection under a tunnel's TLS: while corked, what
// TLS writes is gathered and goes out in one write when uncorked. TLS
// writes each record (at most 16 KiB of data) with a write of its own, so
// without it one 64 KiB WebSocket message costs five system calls, and as
// many wake-ups of the reader on the other side. The WebSocket writer
// corks around each message (or batch of messages); every other write
// (the TLS handshake, the HTTP upgrade) goes straight through.
//
// Corking is the writer's business: cork and uncork are called by one
// writer at a time (wsConn's write lock), while Write may come from TLS on
// behalf of any goroutine, so mu guards the buffer and keeps the bytes in
// the order TLS wrote them.
type corkConn struct {
	net.Conn

	mu     sync.Mutex
	corked bool
	// buf is the gathered bytes: a pooled buffer taken at the first
	// corked write and given back at uncork, so an idle connection holds
	// none.
	buf *[]byte
}

// corkBuffer is the size of the gathering buffer: a 64 KiB message with
// its five TLS records' overhead fits.
const corkBuffer = 256 << 10

// newCorkConn wraps c.
func newCorkConn(c net.Conn) *corkConn { return &corkConn{Conn: c} }

// Write sends p, or gathers it while corked. A write that does not fit in
// what is left of the buffer sends what was gathered first.
func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.corked {
		return c.Conn.Write(p)
	}
	if c.buf == nil {
		c.buf = pool.Get(corkBuffer)
		*c.buf = (*c.buf)[:0]
	}
	if len(*c.buf)+len(p) > cap(*c.buf) {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
		if len(p) > cap(*c.buf) {
			return c.Conn.Write(p)
		}
	}
	*c.buf = append(*c.buf, p...)
	return len(p), nil
}

// cork starts gathering writes. A nil c does nothing, so callers need not
// know whether their connection has a corkConn under it.
func (c *corkConn) cork() {
	if c == nil {
		return
	}
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// uncork sends what was gathered and stops gathering.
func (c *corkConn) uncork() error {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	if c.buf == nil {
		return nil
	}
	err := c.flushLocked()
	pool.Put(c.buf)
	c.buf = nil
	return err
}

func (c *corkConn) flushLocked() error {
	b := *c.buf
	*c.buf = b[:0]
	if len(b) == 0 {
		return nil
	}
	_, err := c.Conn.Write(b)
	return err
}

// corkListener wraps every accepted connection in a corkConn.
type corkListener struct{ net.Listener }

// CorkListener returns ln with every accepted connection able to gather
// the writes of a WebSocket message into one. Put it under the TLS
// listener of the tunnel endpoint; the tunnel corks by itself when it
// finds the connection under its TLS.
func CorkListener(ln net.Listener) net.Listener { return corkListener{ln} }

func (l corkListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return newCorkConn(c), nil
}

// findCork returns the corkConn under a WebSocket's TLS, or nil. Without
// TLS there is nothing to gather: gorilla writes each frame with one write
// (or one writev) already.
func findCork(c net.Conn) *corkConn {
	nc, ok := c.(interface{ NetConn() net.Conn })
	if !ok {
		return nil
	}
	cc, _ := nc.NetConn().(*corkConn)
	return cc
}

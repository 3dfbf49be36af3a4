package tunnel

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"

	"github.com/portway/portway/internal/pool"
)

// outMsg is one WebSocket message waiting for the writer.
type outMsg struct {
	typ int     // websocket.TextMessage or websocket.BinaryMessage
	buf *[]byte // pooled; returned to the pool once written
	// closeAfter makes the writer close the connection once this message
	// is written: used to deliver an error message before closing.
	closeAfter bool
}

// wsConn owns one WebSocket. A single writer goroutine performs every data
// write, taking messages from two queues: control (heartbeats, credits,
// errors) before data, so that a busy data path cannot starve heartbeats.
// Reads happen in one goroutine at a time: the handshake, then the read loop
// of the protocol mode.
type wsConn struct {
	ws           *websocket.Conn
	writeTimeout time.Duration

	ctrlQ chan outMsg
	dataQ chan outMsg

	// chores hands the writer the session's housekeeping once the
	// handshake is done (startChores).
	chores chan chores

	done      chan struct{}
	closeOnce sync.Once
	errMu     sync.Mutex
	err       error

	clock    clock
	epoch    time.Time    // clock.now() when the connection began
	lastRecv atomic.Int64 // nanoseconds since epoch
	// rxBuf is the reusable buffer for whole text messages: those of the
	// handshake, and every message in JSON mode. It is allocated by the
	// first read and dropped when yamux takes over the reading, so an
	// idle yamux session holds none.
	rxBuf []byte
}

// Queue sizes. The data queue bounds what a session buffers on the way out
// (at most dataQueueLen messages of at most one max message each); callers
// block beyond that, which is the backpressure the muxers rely on. The
// control queue only needs to absorb a burst while the writer is busy
// with one message (it takes control first); a channel's buffer is
// allocated whole with the session, so it is kept small.
const (
	ctrlQueueLen = 16
	dataQueueLen = 32
)

// errClosed is the error of a connection closed locally without a reason.
var errClosed = errors.New("tunnel: closed")

func newWSConn(ws *websocket.Conn, maxMessage int, writeTimeout time.Duration, clk clock) *wsConn {
	ws.SetReadLimit(int64(maxMessage))
	c := &wsConn{
		ws:           ws,
		writeTimeout: writeTimeout,
		ctrlQ:        make(chan outMsg, ctrlQueueLen),
		dataQ:        make(chan outMsg, dataQueueLen),
		chores:       make(chan chores),
		done:         make(chan struct{}),
		clock:        clk,
		epoch:        clk.now(),
	}
	c.touch()
	go c.writeLoop()
	return c
}

// now returns a monotonic timestamp in nanoseconds since the connection began.
func (c *wsConn) now() int64 { return int64(c.clock.now().Sub(c.epoch)) }

func (c *wsConn) touch() { c.lastRecv.Store(c.now()) }

// sinceRecv is how long ago the last message arrived.
func (c *wsConn) sinceRecv() time.Duration {
	return time.Duration(c.now() - c.lastRecv.Load())
}

// queueControl queues a message ahead of data, taking ownership of m.buf:
// heartbeats, credits, errors and whatever the read loop itself must send,
// since the read loop must never wait behind data. It blocks while the
// queue is full, and fails once the connection is closed.
func (c *wsConn) queueControl(m outMsg) error { return c.queue(c.ctrlQ, m) }

// queueData queues a message behind the data sent before it, taking
// ownership of m.buf. It blocks while the queue is full, which is the
// backpressure the muxers rely on, and fails once the connection is closed.
func (c *wsConn) queueData(m outMsg) error { return c.queue(c.dataQ, m) }

func (c *wsConn) queue(q chan<- outMsg, m outMsg) error {
	select {
	case q <- m:
		return nil
	case <-c.done:
		pool.Put(m.buf)
		return c.Err()
	}
}

// queueControlText queues a copy of b as a text message ahead of data.
func (c *wsConn) queueControlText(b []byte) error {
	return c.queueControl(outMsg{typ: websocket.TextMessage, buf: getCopy(b)})
}

// queueDataText queues a copy of b as a text message behind data.
func (c *wsConn) queueDataText(b []byte) error {
	return c.queueData(outMsg{typ: websocket.TextMessage, buf: getCopy(b)})
}

// chores are what the writer goroutine does besides writing, once the
// session runs: the heartbeats, and closing the muxer at the end. Doing
// them in the writer rather than in a goroutine of their own saves a stack
// per session, which counts when a gateway holds thousands of idle agents.
type chores struct {
	// ticks drive tick; stop ends them.
	ticks <-chan time.Time
	stop  func()
	// tick returns a heartbeat to write, or nil, or the error that ends
	// the session (the peer fell silent).
	tick func() (*[]byte, error)
	// muxClosed is closed when the muxer ended on its own (yamux), nil
	// otherwise.
	muxClosed <-chan struct{}
	// end closes the muxer once the connection has ended.
	end func()
}

// startChores hands ch to the writer. If the connection has already
// ended, it runs ch's end itself.
func (c *wsConn) startChores(ch chores) {
	select {
	case c.chores <- ch:
	case <-c.done:
		ch.stop()
		ch.end()
	}
}

func (c *wsConn) writeLoop() {
	var ch chores
	choresIn := c.chores
	defer func() {
		if ch.end != nil {
			ch.stop()
			<-c.done
			ch.end()
		}
	}()
	var deadline time.Time
	for {
		var m outMsg
		select {
		case m = <-c.ctrlQ:
		default:
			select {
			case m = <-c.ctrlQ:
			case m = <-c.dataQ:
			case ch = <-choresIn:
				choresIn = nil
				continue
			case <-ch.ticks:
				hb, err := ch.tick()
				if err != nil {
					c.fail(err)
					return
				}
				if hb == nil {
					continue
				}
				m = outMsg{typ: websocket.TextMessage, buf: hb}
			case <-ch.muxClosed:
				c.fail(errors.New("tunnel: yamux session closed"))
				return
			case <-c.done:
				return
			}
		}
		// Extend the deadline only when half of it has passed: setting it
		// on every message would cost a timer update per message.
		if now := time.Now(); now.Add(c.writeTimeout / 2).After(deadline) {
			deadline = now.Add(c.writeTimeout)
			if err := c.ws.SetWriteDeadline(deadline); err != nil {
				pool.Put(m.buf)
				c.fail(fmt.Errorf("tunnel: set write deadline: %w", err))
				return
			}
		}
		err := c.ws.WriteMessage(m.typ, *m.buf)
		pool.Put(m.buf)
		if err != nil {
			c.fail(fmt.Errorf("tunnel: write: %w", err))
			return
		}
		if m.closeAfter {
			c.fail(nil)
			return
		}
	}
}

// readMessage reads one whole message. Text messages land in a buffer that
// is reused by the next call. The gorilla read limit bounds the size.
func (c *wsConn) readMessage() (int, []byte, error) {
	typ, r, err := c.ws.NextReader()
	if err != nil {
		return 0, nil, err
	}
	c.touch()
	if c.rxBuf == nil {
		c.rxBuf = make([]byte, 0, 4<<10)
	}
	b := c.rxBuf[:0]
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, err := r.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err == io.EOF {
			break
		}
		if err != nil {
			return 0, nil, err
		}
	}
	// Keep a modest buffer between messages; a rare huge one is dropped.
	if cap(b) <= 1<<20 {
		c.rxBuf = b
	}
	return typ, b, nil
}

// fail closes the connection, recording err as the reason if it is the
// first. A nil err records errClosed.
func (c *wsConn) fail(err error) {
	if err == nil {
		err = errClosed
	}
	c.errMu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.errMu.Unlock()
	c.closeOnce.Do(func() {
		close(c.done)
		// WriteControl may run concurrently with the writer; the close
		// frame is a courtesy, so its deadline is short.
		_ = c.ws.WriteControl(websocket.CloseMessage,
			websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(100*time.Millisecond))
		_ = c.ws.Close()
	})
}

// Err returns why the connection closed, or nil while it is open.
func (c *wsConn) Err() error {
	c.errMu.Lock()
	defer c.errMu.Unlock()
	return c.err
}

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
	// ctrl marks a message of the control queue, counted in ctrlPending.
	ctrl bool
}

// wsConn owns one WebSocket. A writer goroutine takes messages from two
// queues: control (heartbeats, credits, errors) before data, so that a busy
// data path cannot starve heartbeats. In yamux mode, yamux's own send loop
// writes its frames directly (writeDirect) instead of handing them to the
// writer: yamux already orders and queues them, and a second hand-over
// would cost a copy of every byte and a goroutine wake-up per frame.
// Reads happen in one goroutine at a time: the handshake, then the read loop
// of the protocol mode.
//
// Lock order: wmu, then the corkConn's lock (taken by its methods). Nothing
// outside the package is called with wmu held except the WebSocket and the
// connection under it.
type wsConn struct {
	ws           *websocket.Conn
	writeTimeout time.Duration
	// cork is the connection under the WebSocket's TLS, which gathers the
	// TLS records of a message into one write; nil without TLS.
	cork *corkConn

	// wmu serializes writes of whole messages, and guards deadline.
	wmu      sync.Mutex
	deadline time.Time // the write deadline last set
	// ctrlPending counts control messages queued and not yet written,
	// whether still in ctrlQ or already in the writer's hands. A direct
	// write waits until it is zero, so that control queued before data is
	// written before it (the handshake's last message before the first
	// yamux frame), as the writer's priority order guarantees for queued
	// data. ctrlDone, on wmu, is signalled when it drops and when the
	// connection closes.
	ctrlPending atomic.Int64
	ctrlDone    *sync.Cond

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
		cork:         findCork(ws.NetConn()),
		ctrlQ:        make(chan outMsg, ctrlQueueLen),
		dataQ:        make(chan outMsg, dataQueueLen),
		chores:       make(chan chores),
		done:         make(chan struct{}),
		clock:        clk,
		epoch:        clk.now(),
	}
	c.ctrlDone = sync.NewCond(&c.wmu)
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
func (c *wsConn) queueControl(m outMsg) error {
	m.ctrl = true
	c.ctrlPending.Add(1)
	return c.queue(c.ctrlQ, m)
}

// queueData queues a message behind the data sent before it, taking
// ownership of m.buf. It blocks while the queue is full, which is the
// backpressure the muxers rely on, and fails once the connection is closed.
func (c *wsConn) queueData(m outMsg) error { return c.queue(c.dataQ, m) }

func (c *wsConn) queue(q chan<- outMsg, m outMsg) error {
	select {
	case q <- m:
		return nil
	case <-c.done:
		c.release(m)
		return c.Err()
	}
}

// release returns a message's buffer once it is written or dropped, and
// counts a control message as no longer pending. The caller holds wmu, or
// the message never reached a queue.
func (c *wsConn) release(m outMsg) {
	pool.Put(m.buf)
	if m.ctrl && c.ctrlPending.Add(-1) == 0 {
		c.ctrlDone.Broadcast()
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

// writeBatch is the most queued messages the writer sends under one cork,
// so that control messages and data queued together leave in one write.
const writeBatch = 16

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
		if !c.writeQueued(m) {
			return
		}
	}
}

// writeQueued writes m, and then whatever else is already queued (up to
// writeBatch messages, control first), under one cork. It reports whether
// the connection is still open.
func (c *wsConn) writeQueued(m outMsg) bool {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.cork.cork()
	open := true
	for i := 0; ; i++ {
		err := c.writeLocked(m.typ, *m.buf)
		c.release(m)
		if err != nil {
			c.cork.uncork()
			c.fail(fmt.Errorf("tunnel: write: %w", err))
			return false
		}
		if m.closeAfter {
			open = false
			break
		}
		var ok bool
		if i+1 < writeBatch {
			m, ok = c.nextQueued()
		}
		if !ok {
			break
		}
	}
	if err := c.cork.uncork(); err != nil {
		c.fail(fmt.Errorf("tunnel: write: %w", err))
		return false
	}
	if !open {
		c.fail(nil)
	}
	return open
}

// nextQueued takes a queued message without waiting, control first.
func (c *wsConn) nextQueued() (outMsg, bool) {
	select {
	case m := <-c.ctrlQ:
		return m, true
	default:
	}
	select {
	case m := <-c.dataQ:
		return m, true
	default:
		return outMsg{}, false
	}
}

// writeDirect writes one message from the calling goroutine, in the order
// of the calls, without queueing or copying it. It blocks while the
// message is written, which is the backpressure a net.Conn gives its
// writer, and fails once the connection is closed.
func (c *wsConn) writeDirect(typ int, b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.cork.cork()
	for {
		select {
		case <-c.done:
			c.cork.uncork()
			return c.Err()
		default:
		}
		if c.ctrlPending.Load() == 0 {
			break
		}
		// Control messages were queued before this write: they go first,
		// written by the writer (which may hold the first of them already),
		// so that they stay in their order.
		c.ctrlDone.Wait()
		c.cork.cork() // the writer uncorked in between
	}
	err := c.writeLocked(typ, b)
	if uerr := c.cork.uncork(); err == nil {
		err = uerr
	}
	if err != nil {
		err = fmt.Errorf("tunnel: write: %w", err)
		c.fail(err)
		return err
	}
	return nil
}

// writeLocked writes one message. The caller holds wmu.
func (c *wsConn) writeLocked(typ int, b []byte) error {
	// Extend the deadline only when half of it has passed: setting it
	// on every message would cost a timer update per message.
	if now := time.Now(); now.Add(c.writeTimeout / 2).After(c.deadline) {
		c.deadline = now.Add(c.writeTimeout)
		if err := c.ws.SetWriteDeadline(c.deadline); err != nil {
			return fmt.Errorf("set write deadline: %w", err)
		}
	}
	return c.ws.WriteMessage(typ, b)
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
		// Wake direct writers waiting for control messages that will now
		// never be written. Taking wmu first means none is between its
		// check of done and its wait; fail may be called with wmu held,
		// hence the goroutine.
		go func() {
			c.wmu.Lock()
			c.ctrlDone.Broadcast()
			c.wmu.Unlock()
		}()
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
